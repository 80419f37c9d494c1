"""Forge's integrated extensions beside FAM, live, on every WebUI whose URL is set that lists
them (`/sdapi/v1/scripts`; A1111 and Forge Classic ship none, so they skip) and an SD1
checkpoint, e.g.
FAM_FORGE_URL=http://127.0.0.1:7870 python -m pytest -q tests/live/test_live_forge_builtins.py

The settings are strong enough to change the image on their own, so "FAM + it differs from
FAM alone" shows the combination was exercised; where an extension still changes nothing
(FreeU keys on channel counts a slim test UNet does not have), that check is skipped with
the reason."""

import functools

import pytest

from client import same_pixels
from combos import FIRST, check, refused, webui  # noqa: F401

# title (Forge main adds " (SD 1.x, SD 2.x, SDXL)" to some, reForge not), positional args
# (the API fills the rest with the UI's defaults)
WORKS = {
    "sag": ("SelfAttentionGuidance Integrated", [True, 0.5, 2.0, 1.0]),
    "pag": ("PerturbedAttentionGuidance Integrated", [True, 3.0, 0.0, 0.0, 1.0]),
    "freeu": ("FreeU Integrated", [True, 1.5, 1.6, 0.9, 0.2, 0.0, 1.0]),
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


def need(host, title) -> str:
    """The server's title for the script (skips without it or an SD1 checkpoint)."""
    listed = host.need_script(title)
    host.checkpoint("sd1")
    return listed


@functools.cache
def job(host, name, with_fam=True, am=True):
    """(status, response) of one generation per (extension or "none", FAM on/off, AM
    on/off), shared between tests; "again" repeats "none"."""
    fam_args = ({} if am else {"am_enabled": False}) if with_fam else None
    if name in ("none", "again"):
        return host.call("/sdapi/v1/txt2img", host.body("sd1", fam_args=fam_args))
    title, args, extra = {**{k: (*v, {}) for k, v in WORKS.items()}, **AM_CONFLICTS,
                          "neveroom": (NEVER_OOM, [True, False], {})}[name]
    return host.call("/sdapi/v1/txt2img", host.body(
        "sd1", fam_args=fam_args, scripts={host.need_script(title): args}, **extra))


@pytest.fixture(autouse=True, scope="module")
def plain_first(webui):
    """The image without FAM before any FAM job, for the bit-identity test at the end."""
    ok(webui, "none", with_fam=False)


def ok(host, name, **kw):
    status, r = job(host, name, **kw)
    assert status == 200, r
    return r


SIDE = 2 * FIRST


@pytest.mark.parametrize("name", WORKS)
def test_extension_works_beside_fam(webui, name):
    need(webui, WORKS[name][0])
    check(ok(webui, name), SIDE)


@pytest.mark.parametrize("name", WORKS)
def test_fam_with_the_extension_differs_from_fam_alone(webui, name):
    need(webui, WORKS[name][0])
    if same_pixels(ok(webui, name, with_fam=False), ok(webui, "none", with_fam=False)):
        pytest.skip(f"{WORKS[name][0]} changes nothing on this checkpoint even without FAM")
    assert not same_pixels(ok(webui, name), ok(webui, "none"))


@pytest.mark.parametrize("name", AM_CONFLICTS)
def test_am_conflict_is_refused_by_name_and_fm_runs_alone(webui, name):
    title, args, extra = AM_CONFLICTS[name]
    listed = need(webui, title)
    detail = refused(webui, "/sdapi/v1/txt2img",
                     webui.body("sd1", fam_args={}, scripts={listed: args}, **extra), title)
    assert "Attention Modulation" in detail
    off = ok(webui, name, am=False)
    assert len(off["images"]) == extra.get("batch_size", 1)
    info = check(off, SIDE)
    assert info["FAM AM"] == "False" and info["FAM FM"] == "True"


def test_never_oom_keeps_the_record_in_ram(webui):
    need(webui, NEVER_OOM)
    info = check(ok(webui, "neveroom"), SIDE)
    assert info["FAM record"] == "kept in RAM (low VRAM)"


def test_plain_generation_after_fam_is_bit_identical(webui):
    """Last in the file: the FAM + extension jobs above ran between the two."""
    assert same_pixels(ok(webui, "none", with_fam=False), ok(webui, "again", with_fam=False))
