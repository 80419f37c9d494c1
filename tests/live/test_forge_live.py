"""Against a running Forge (main / Neo / ersatzForge, or Classic / reForge) with this extension
installed and an SD1.x checkpoint; skipped unless FAM_FORGE_URL is set, e.g.
FAM_FORGE_URL=http://127.0.0.1:7870 python -m pytest -q tests/live/test_forge_live.py

Forge on a CPU is slow (a full-size SD1.5 step at 256² takes a minute or more), so this is a
subset at 128² -> 256² with 2 + 2 steps, every job run once and shared between tests."""

import functools
import os

import pytest

from client import WebUI, fam, infotext, pixels, same_pixels, settings, TITLE

URL = os.environ.get("FAM_FORGE_URL", "")
pytestmark = pytest.mark.skipif(not URL, reason="FAM_FORGE_URL is not set")
webui = WebUI(URL)
BASE = {"prompt": "a lighthouse on a cliff", "negative_prompt": "blurry", "steps": 2,
        "width": 128, "height": 128, "sampler_name": "Euler", "scheduler": "Automatic",
        "cfg_scale": 7, "seed": 7, "enable_hr": True, "hr_scale": 2,
        "hr_second_pass_steps": 2, "denoising_strength": 0.5}
FORGE_MAIN = {"hr_cfg": 7, "hr_additional_modules": ["Use same choices"]}   # where they exist


def body(**over):
    """BASE with Forge main's Hires fields where this WebUI has them (Classic refuses them)."""
    return {**BASE, "hr_upscaler": webui.latent_upscaler,
            **{k: v for k, v in FORGE_MAIN.items() if k in webui.txt2img_fields}, **over}
POSITIONAL = [True, True, 0.5, True, 0.5, "auto", True, 8192, True]   # = FamParams(enabled=True, am_lambda=0.5)


@functools.cache
def job(name):
    """Each generation once per session (they take minutes on a CPU)."""
    bodies = {
        "plain": lambda: body(),
        "fam": lambda: body(**fam(am_lambda=0.5)),
        "positional": lambda: body(alwayson_scripts={TITLE: {"args": POSITIONAL}}),
        "batch": lambda: {**body(prompt="a lighthouse AND a storm :0.5", batch_size=2, **fam()),
                          **({"hr_cfg": 1} if "hr_cfg" in webui.txt2img_fields else {})},
        "plain_again": lambda: body(),
    }
    return webui.generate(**bodies[name]())


def test_fam_changes_the_hires_image_and_says_so():
    plain, with_fam = job("plain"), job("fam")
    assert [im.size for im in pixels(with_fam)] == [(256, 256)]
    assert not same_pixels(plain, with_fam)
    info = settings(infotext(with_fam))
    assert info["FAM"] == "True" and info["FAM AM lambda"] == "0.5"
    assert "FAM AM skipped" not in info and "FAM note" not in info
    assert "Denoising strength: 1.0" in infotext(with_fam)          # full re-noise
    assert not settings(infotext(plain))


def test_dict_and_positional_forms_give_the_same_image():
    assert same_pixels(job("fam"), job("positional"))


@pytest.mark.parametrize("change, key", [
    (fam(fm_cutof=0.3), "fm_cutof"),
    (fam(am_lambda=1.5), "am_lambda"),
    (fam(am_blocks="0,1"), "AM blocks"),
    ({**fam(), "enable_hr": False}, "Hires. fix"),
])
def test_bad_requests_get_a_422_naming_the_problem(change, key):
    status, r = webui.call("/sdapi/v1/txt2img", body(**change))
    assert status == 422, r
    assert key in r["detail"] and "Traceback" not in str(r)


def test_infotext_round_trip():
    first = job("fam")
    extra = {k: v for k, v in FORGE_MAIN.items() if k == "hr_additional_modules"
             and k in webui.txt2img_fields}
    status, again = webui.call("/sdapi/v1/txt2img", {"infotext": infotext(first),
                                                     "hr_sampler_name": "Euler", **extra})
    if status == 500 and "parameterized generic" in again.get("message", ""):
        # Forge main (dfdcbab6) fails on every `infotext` request, FAM or not
        status, plain = webui.call("/sdapi/v1/txt2img", {"infotext": BASE["prompt"], **extra})
        assert status == 500 and plain.get("message") == again["message"], plain
        pytest.skip(f"this WebUI's API fails on any infotext request: {again['message']}")
    assert status == 200, again
    assert settings(infotext(again)) == settings(infotext(first))
    assert same_pixels(first, again)


def test_batch_of_two_with_and_and_hires_cfg_one():
    r = job("batch")
    assert len(r["images"]) == 2 and [im.size for im in pixels(r)] == [(256, 256)] * 2
    text = infotext(r)
    assert "FAM AM skipped" not in text and "FAM note" not in text


def test_img2img_upscaling():
    request = {"init_images": [job("plain")["images"][0]], "prompt": BASE["prompt"], "steps": 2,
               "width": 576, "height": 576, "sampler_name": "Euler", "seed": 3, "cfg_scale": 7,
               "denoising_strength": 0.5}
    status, r = webui.call("/sdapi/v1/img2img", {**request, "width": 512, "height": 512, **fam()})
    assert status == 422 and "larger than the model's native size" in r["detail"]
    r = webui.generate("/sdapi/v1/img2img", **request, **fam(full_renoise=False))
    assert [im.size for im in pixels(r)] == [(576, 576)]
    info = settings(infotext(r))
    assert info["FAM AM path"] == "recompute" and "FAM AM skipped" not in info


def test_plain_generation_after_fam_is_bit_identical():
    job("fam"), job("batch")
    webui.call("/sdapi/v1/txt2img", body(**fam(am_lambda=2)))           # a failed request too
    assert same_pixels(job("plain"), job("plain_again"))
