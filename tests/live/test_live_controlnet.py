"""FAM beside ControlNet (A1111: sd-webui-controlnet; Forge: its built-in), live: every WebUI
whose URL is set (FAM_A1111_URL, FAM_FORGE_URL) that lists a ControlNet model of the family.
Preprocessor "none" with a given hint, so nothing is downloaded."""

import pytest

from client import infotext
from combos import FIRST, NATIVE, check, family, hint, plain_unchanged, refused, webui  # noqa: F401

TXT, IMG = "/sdapi/v1/txt2img", "/sdapi/v1/img2img"
RESULT = slice(0, 1)      # in txt2img ControlNet appends its hint (detected map) to the images


def unit(host, family, image, **over):
    model, module = host.controlnet(family)
    return {"enabled": True, "module": module, "model": model, "image": image, "weight": 1.0,
            "resize_mode": "Crop and Resize", "control_mode": "Balanced",
            "guidance_start": 0.0, "guidance_end": 1.0, "pixel_perfect": False,
            "processor_res": 512, "hr_option": "Both", **over}


@pytest.mark.parametrize("budget", [None, 0], ids=["record", "recompute"])
@pytest.mark.parametrize("option", ["Both", "Low res only", "High res only"])
def test_txt2img_hires_fix_with_a_unit(webui, family, option, budget):
    """Each of ControlNet's Hires options, with the native record and with the native UNet
    re-run in the high-res pass (record budget 0)."""
    cn = {"controlnet": [unit(webui, family, hint(FIRST), hr_option=option)]}
    fam_args = {} if budget is None else {"record_budget_mb": budget}
    r = webui.generate(**webui.body(family, fam_args=fam_args, scripts=cn))
    info = check(r, 2 * FIRST, images=RESULT)
    assert "ControlNet 0" in infotext(r)
    assert info.get("FAM AM path") == (None if budget is None else "recompute")   # only the recompute path is named


def test_txt2img_plain_controlnet_unchanged_by_a_fam_run(webui, family):
    cn = {"controlnet": [unit(webui, family, hint(FIRST))]}
    r = plain_unchanged(webui, TXT, webui.body(family, scripts=cn),
                        webui.body(family, fam_args={"record_budget_mb": 0}, scripts=cn))
    check(r, 2 * FIRST, images=RESULT)


def test_img2img_upscaling_with_a_tile_unit(webui, family):
    """The hint is the input picture, at its own size: ControlNet resizes it to the target,
    FAM's native-size calls must get it at the native size."""
    source = webui.source(family)
    cn = {"controlnet": [unit(webui, family, source, resize_mode="Just Resize")]}
    r = plain_unchanged(webui, IMG, webui.img2img_body(family, source, scripts=cn),
                        webui.img2img_body(family, source, fam_args={}, scripts=cn))
    info = check(r, NATIVE[family] + 64)
    assert info["FAM AM path"] == "recompute" and "FAM ControlNet" in info
    assert "ControlNet 0" in infotext(r)


def test_img2img_upscaling_with_two_units(webui, family):
    source = webui.source(family)
    cn = {"controlnet": [unit(webui, family, source, resize_mode="Just Resize"),
                         unit(webui, family, hint(FIRST, seed=1), weight=0.5)]}
    r = webui.generate(IMG, **webui.img2img_body(family, source, fam_args={}, scripts=cn))
    info = check(r, NATIVE[family] + 64)
    assert info["FAM AM path"] == "recompute" and "FAM ControlNet" in info
    assert "ControlNet 1" in infotext(r)


def test_reference_unit_is_refused_while_am_is_on(webui, family):
    """A reference unit rewrites self-attention, where AM works: refused by name with AM on,
    FM alone beside it with AM off. Needs no ControlNet model."""
    if family != "sd1":
        pytest.skip("the refusal does not depend on the model family")
    webui.controlnet(family)                        # skips without ControlNet
    module = next((m for m in webui._controlnet[1] if m.lower().startswith("reference")), None)
    if module is None:
        pytest.skip(f"{webui} lists no reference preprocessor")
    cn = {"controlnet": [unit(webui, family, hint(FIRST), module=module, model="None")]}
    refused(webui, TXT, webui.body(family, fam_args={}, scripts=cn), f"ControlNet {module} unit")
    r = webui.generate(**webui.body(family, fam_args={"am_enabled": False}, scripts=cn))
    assert check(r, 2 * FIRST, images=RESULT)["FAM AM"] == "False"
