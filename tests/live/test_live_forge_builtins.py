"""Forge's integrated extensions beside FAM, against a running Forge with an SD1.x checkpoint;
skipped unless FAM_FORGE_URL is set, e.g.
FAM_FORGE_URL=http://127.0.0.1:7870 python -m pytest -q tests/live/test_live_forge_builtins.py

Which extensions exist is read from the server (`/sdapi/v1/scripts`); only absent ones are
skipped (Forge Classic ships none of them). The settings are strong enough to change the
image on their own, so "FAM + it differs from FAM alone" shows the combination was
exercised; where an extension still changes nothing (FreeU keys on channel counts a slim
test UNet does not have), that check is skipped with the reason."""

import functools
import os

import pytest

from client import WebUI, fam, infotext, pixels, same_pixels, settings

URL = os.environ.get("FAM_FORGE_URL", "")
pytestmark = pytest.mark.skipif(not URL, reason="FAM_FORGE_URL is not set")
webui = WebUI(URL)
BASE = {"prompt": "a lighthouse on a cliff", "negative_prompt": "blurry", "steps": 2,
        "width": 128, "height": 128, "sampler_name": "Euler", "scheduler": "Automatic",
        "cfg_scale": 7, "seed": 7, "enable_hr": True, "hr_scale": 2,
        "hr_second_pass_steps": 2, "denoising_strength": 0.5}
FORGE_MAIN = {"hr_cfg": 7, "hr_additional_modules": ["Use same choices"]}

# title, positional args (the API fills the rest with the UI's defaults)
WORKS = {
    "sag": ("SelfAttentionGuidance Integrated (SD 1.x, SD 2.x, SDXL)", [True, 0.5, 2.0, 1.0]),
    "pag": ("PerturbedAttentionGuidance Integrated", [True, 3.0, 0.0, 0.0, 1.0]),
    "freeu": ("FreeU Integrated (SD 1.x, SD 2.x, SDXL)", [True, 1.5, 1.6, 0.9, 0.2, 0.0, 1.0]),
    # mimic scale 1 and a 0.9 percentile clamp CFG 7 (at mimic = CFG it is a no-op)
    "dynthres": ("DynamicThresholding (CFG-Fix) Integrated", [True, 1.0, 0.9]),
    # Reinhard tone-mapping of the CFG difference (its default sharpness acts on late steps only)
    "latentmod": ("LatentModifier Integrated", [True, 0.0, "anisotropic", 1.0, "reinhard"]),
}
# refused while AM is on; title, args, extra request fields
AM_CONFLICTS = {
    "kohya": ("Kohya HRFix Integrated", [True, 3, 2.0, 0.0, 0.35, True, "bicubic", "bicubic"], {}),
    "stylealign": ("StyleAlign Integrated", [True, 1.0], {"batch_size": 2}),
    "multidiffusion": ("MultiDiffusion Integrated", [True, "MultiDiffusion", 128, 128, 32, 4], {}),
}
NEVER_OOM = "Never OOM Integrated"


@functools.cache
def installed() -> set:
    status, r = webui.call("/sdapi/v1/scripts")
    assert status == 200, r
    return set(r["txt2img"])


def need(title):
    if title.lower() not in installed():
        pytest.skip(f"{title} is not installed on this WebUI")


def body(fam_settings=None, scripts=None, **over):
    """BASE with Forge main's Hires fields where this WebUI has them, FAM and other scripts."""
    alwayson = {**(fam(**fam_settings)["alwayson_scripts"] if fam_settings is not None else {}),
                **(scripts or {})}
    return {**BASE, "hr_upscaler": webui.latent_upscaler,
            **{k: v for k, v in FORGE_MAIN.items() if k in webui.txt2img_fields},
            "alwayson_scripts": alwayson, **over}


@functools.cache
def job(name, with_fam=True, am=True):
    """One generation per (extension or "none", FAM on/off, AM on/off), shared between
    tests; "again" repeats "none"."""
    settings_ = ({} if am else {"am_enabled": False}) if with_fam else None
    if name in ("none", "again"):
        return webui.call("/sdapi/v1/txt2img", body(settings_))
    title, args, extra = {**{k: (*v, {}) for k, v in WORKS.items()}, **AM_CONFLICTS,
                          "neveroom": (NEVER_OOM, [True, False], {})}[name]
    return webui.call("/sdapi/v1/txt2img", body(settings_, {title: {"args": args}}, **extra))


@pytest.fixture(autouse=True, scope="module")
def plain_first():
    """The image without FAM before any FAM job, for the bit-identity test at the end."""
    ok("none", with_fam=False)


def ok(name, **kw):
    status, r = job(name, **kw)
    assert status == 200, r
    return r


def assert_fam_ran(r, size=(256, 256), am=True):
    """Right size, a non-constant image, FAM's keys, and AM not skipped anywhere."""
    ims = pixels(r)
    assert ims and all(im.size == size for im in ims)
    assert all(lo != hi for im in ims for lo, hi in im.getextrema())
    text = infotext(r)
    info = settings(text)
    assert info["FAM"] == "True" and info["FAM FM"] == "True" and info["FAM AM"] == str(am)
    assert "FAM AM skipped" not in text and "FAM note" not in text
    return info


@pytest.mark.parametrize("name", WORKS)
def test_extension_works_beside_fam(name):
    need(WORKS[name][0])
    assert_fam_ran(ok(name))


@pytest.mark.parametrize("name", WORKS)
def test_fam_with_the_extension_differs_from_fam_alone(name):
    need(WORKS[name][0])
    if same_pixels(ok(name, with_fam=False), ok("none", with_fam=False)):
        pytest.skip(f"{WORKS[name][0]} changes nothing on this checkpoint even without FAM")
    assert not same_pixels(ok(name), ok("none"))


@pytest.mark.parametrize("name", AM_CONFLICTS)
def test_am_conflict_is_refused_by_name_and_fm_runs_alone(name):
    title, _, extra = AM_CONFLICTS[name]
    need(title)
    status, r = job(name)
    assert status == 422, r
    assert title in r["detail"] and "Attention Modulation" in r["detail"]
    assert "Traceback" not in str(r)
    off = ok(name, am=False)
    assert len(off["images"]) == extra.get("batch_size", 1)
    assert_fam_ran(off, am=False)


def test_never_oom_keeps_the_record_in_ram():
    need(NEVER_OOM)
    info = assert_fam_ran(ok("neveroom"))
    assert info["FAM record"] == "kept in RAM (low VRAM)"


def test_plain_generation_after_fam_is_bit_identical():
    """Last in the file: the FAM + extension jobs above ran between the two."""
    assert same_pixels(ok("none", with_fam=False), ok("again", with_fam=False))
