"""FAM beside ADetailer, live, on every WebUI whose URL is set that lists ADetailer and a
detector of its own (a .pt in models/adetailer: nothing downloaded). Its inpaint passes run
on a copy of the job: neither FAM-guided nor refused, and the main image keeps FAM's infotext."""

import pytest

from client import infotext, same_pixels
from combos import FIRST, check, family, plain_unchanged, webui  # noqa: F401

TXT = "/sdapi/v1/txt2img"


def adetailer(host):
    host.need_script("adetailer")
    models = (host.get("/adetailer/v1/ad_model") or {}).get("ad_model", [])
    local = [m for m in models if m.endswith(".pt")]
    if not local:
        pytest.skip(f"{host} lists no local ADetailer detector: {models}")
    return [True, False, {"ad_model": local[0], "ad_mask_k": 1, "ad_confidence": 0.3,
                          "ad_use_steps": True, "ad_steps": 2, "ad_inpaint_only_masked": True}]


@pytest.mark.parametrize("only_selected", [True, False], ids=["default", "fam-in-its-scripts"])
def test_adetailer_after_a_fam_hires_fix(webui, family, only_selected):
    """ad_only_selected_scripts False: ADetailer keeps every script in its passes, FAM too."""
    ad = {"ADetailer": adetailer(webui)}

    def body(**kw):
        b = webui.body(family, **kw)
        b["override_settings"]["ad_only_selected_scripts"] = only_selected
        return b

    with_ad = plain_unchanged(webui, TXT, body(scripts=ad),
                              body(fam_args={"record_budget_mb": 0}, scripts=ad))
    info = check(with_ad, 2 * FIRST)
    assert info["FAM AM path"] == "recompute" and "ADetailer model" in infotext(with_ad)
    fam_alone = webui.generate(**body(fam_args={"record_budget_mb": 0}))
    assert not same_pixels(with_ad, fam_alone)          # its inpaint pass changed the image
