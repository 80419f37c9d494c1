"""A PNG from `python -m fam generate`, read by a running AUTOMATIC1111's own PNG Info parser
(`/sdapi/v1/png-info`): the WebUI sees the prompt, the Hires fix settings and every FAM entry.
Skipped unless FAM_A1111_URL is set (a WebUI started with --api), e.g.
FAM_A1111_URL=http://127.0.0.1:7861 python -m pytest -q tests/live/test_png_info_live.py"""

import base64
import json
import os
import urllib.request

import pytest

URL = os.environ.get("FAM_A1111_URL", "").rstrip("/")
pytestmark = pytest.mark.skipif(not URL, reason="FAM_A1111_URL is not set")


def test_webui_png_info_reads_the_runners_parameters(tmp_path):
    pytest.importorskip("transformers")
    from tiny_pipeline import save_sd15
    from fam.__main__ import main
    from fam.params import FamParams

    model = save_sd15(str(tmp_path / "tiny-sd15"))
    out = tmp_path / "fam.png"
    assert main(["generate", "--model", model, "--prompt", "a lighthouse, storm: night",
                 "--negative", "blurry", "--steps", "2", "--sampler", "DPM++ 2M Karras",
                 "--seed", "11", "--scale", "1.5", "--am-lambda", "0.6", "--am-blocks", "3,4",
                 "--no-fm", "--quiet", "--out", str(out)]) == 0
    image = "data:image/png;base64," + base64.b64encode(out.read_bytes()).decode()
    req = urllib.request.Request(f"{URL}/sdapi/v1/png-info", json.dumps({"image": image}).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        params = json.load(r)["parameters"]
    assert params["Prompt"] == "a lighthouse, storm: night"
    assert params["Negative prompt"] == "blurry"
    assert {k: str(params[k]) for k in ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed",
                                        "Size-1", "Size-2", "Denoising strength",
                                        "Hires upscale", "Hires upscaler")} == {
        "Steps": "2", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7.0",
        "Seed": "11", "Size-1": "128", "Size-2": "128", "Denoising strength": "1.0",
        "Hires upscale": "1.5", "Hires upscaler": "Latent (bicubic)"}
    assert FamParams.from_infotext(params) == FamParams(
        enabled=True, fm_enabled=False, am_lambda=0.6, am_blocks="3,4")
