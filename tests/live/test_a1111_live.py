"""Against a running AUTOMATIC1111 1.10 with this extension installed (an SD1 or SDXL
checkpoint; a tiny random one on CPU is enough). Skipped unless FAM_A1111_URL is set, e.g.
FAM_A1111_URL=http://127.0.0.1:7860 python -m pytest -q tests/live

Runs in the WebUI's own Python: it needs pytest (Pillow for the pixel comparisons) and
nothing of this project. The loaded model's family is read from its checkpoint name ("xl"
means SDXL) unless FAM_A1111_ARCH=sd1|sdxl says it; with FAM_A1111_LOG (the server's log
file) the quiet-422 test reads what the server printed."""

import json
import os
import threading
import time

import pytest

from client import TITLE, WebUI, fam, infotext, pixels, same_pixels, settings

URL = os.environ.get("FAM_A1111_URL", "").rstrip("/")
LOG = os.environ.get("FAM_A1111_LOG", "")
pytestmark = pytest.mark.skipif(not URL, reason="FAM_A1111_URL is not set")
call, generate = WebUI(URL).call, WebUI(URL).generate


def _arch():
    forced = os.environ.get("FAM_A1111_ARCH")
    if forced or not URL:
        return forced or "sd1"
    _, options = call("/sdapi/v1/options")
    return "sdxl" if "xl" in str(options.get("sd_model_checkpoint", "")).lower() else "sd1"


ARCH = _arch()
NATIVE = 1024 if ARCH == "sdxl" else 512          # FAM's native size for the family
FIRST = NATIVE // 2                               # first passes: random weights, any size works
BASE = {"prompt": "a lighthouse on a cliff", "negative_prompt": "blurry", "steps": 4,
        "width": FIRST, "height": FIRST, "sampler_name": "Euler", "seed": 7,
        "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 4,
        "denoising_strength": 0.7}
UPSCALE = NATIVE + 128                            # an img2img target above the native size


def test_script_info_lists_every_setting_with_its_range():
    status, scripts = call("/sdapi/v1/script-info")
    mine = [s for s in scripts if s["name"] == TITLE.lower() and not s["is_img2img"]]
    assert status == 200 and len(mine) == 1
    args = {a["label"]: a for a in mine[0]["args"]}
    assert args["AM lambda"]["minimum"] == 0 and args["AM lambda"]["maximum"] == 1
    assert args["FM cutoff c"]["value"] == 0.5 and len(args) == 9


def test_txt2img_hires_with_and_without_fam():
    plain = generate(**BASE)
    with_fam = generate(**BASE, **fam())
    assert [im.size for im in pixels(with_fam)] == [(2 * FIRST, 2 * FIRST)]
    assert not same_pixels(plain, with_fam)
    info = settings(infotext(with_fam))
    assert info["FAM"] == "True" and info["FAM AM lambda"] == "0.7"
    assert "FAM AM skipped" not in info
    assert "Denoising strength: 1.0" in infotext(with_fam)      # full re-noise
    assert not settings(infotext(plain))


def test_dict_and_positional_forms_give_the_same_image():
    as_dict = generate(**BASE, **fam(am_lambda=0.5))
    positional = [True, True, 0.5, True, 0.5, "auto", True, 8192, True]
    as_list = generate(**BASE, alwayson_scripts={TITLE: {"args": positional}})
    assert same_pixels(as_dict, as_list)


@pytest.mark.parametrize("body, key", [
    (fam(fm_cutof=0.3), "fm_cutof"),
    (fam(am_lambda=1.5), "am_lambda"),
    (fam(record_budget_mb="lots"), "record_budget_mb"),
    (fam(am_blocks="6,7" if ARCH == "sdxl" else "0,1"), "AM blocks"),   # no attention there
    ({**fam(), "enable_hr": False}, "Hires. fix"),
])
def test_bad_requests_get_a_422_naming_the_problem(body, key):
    status, r = call("/sdapi/v1/txt2img", {**BASE, **body})
    assert status == 422, r
    assert key in r["detail"] and "Traceback" not in json.dumps(r)


def test_infotext_round_trip():
    first = generate(**BASE, **fam(am_lambda=0.55, am_blocks="3,4", fm_cutoff=0.4))
    text = infotext(first)
    # hr_sampler_name: the WebUI's API rejects its own default when the infotext has none
    again = generate(infotext=text, hr_sampler_name="Euler")
    assert settings(infotext(again)) == settings(text)
    assert same_pixels(first, again)


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "Heun", "DDIM", "UniPC"])
def test_samplers_are_guided_without_skips(sampler):
    r = generate(**{**BASE, "sampler_name": sampler}, **fam())
    assert "FAM AM skipped" not in infotext(r)


def test_batch_and_and_prompts():
    body = {**BASE, "prompt": "a lighthouse AND a storm :0.5", "batch_size": 2}
    r = generate(**body, **fam())
    assert len(r["images"]) == 2 and "FAM AM skipped" not in infotext(r)


def test_img2img_upscaling():
    source = generate(**{**BASE, "enable_hr": False})
    body = {"init_images": [source["images"][0]], "prompt": BASE["prompt"], "steps": 4,
            "width": UPSCALE, "height": UPSCALE, "sampler_name": "Euler", "seed": 3,
            "denoising_strength": 0.6}
    plain = generate("/sdapi/v1/img2img", **body)
    with_fam = generate("/sdapi/v1/img2img", **body, **fam())
    assert [im.size for im in pixels(with_fam)] == [(UPSCALE, UPSCALE)]
    assert not same_pixels(plain, with_fam)
    info = settings(infotext(with_fam))
    assert info["FAM AM path"] == "recompute" and "FAM AM skipped" not in info
    status, r = call("/sdapi/v1/img2img", {**body, "width": NATIVE, "height": NATIVE, **fam()})
    assert status == 422 and "larger than the model's native size" in r["detail"]
    status, r = call("/sdapi/v1/img2img", {**body, "mask": source["images"][0], **fam()})
    assert status == 422 and "does not inpaint" in r["detail"]


def test_xyz_axes_for_fam_settings():
    _, scripts = call("/sdapi/v1/script-info")
    xyz = next(s for s in scripts if s["name"] == "x/y/z plot" and not s["is_img2img"])
    axes = xyz["args"][0]["choices"]
    assert {"[FAM] Enable FAM", "[FAM] AM lambda", "[FAM] FM cutoff c"} <= set(axes)
    x, y = axes.index("[FAM] AM lambda"), axes.index("[FAM] Enable FAM")
    grid = generate(**BASE, script_name="x/y/z plot", script_args=[
        x, "0.0, 0.7", None, y, "", ["False", "True"], 0, "", None,
        True, True, False, False, False, False, False, 0, False])
    cells = grid["images"][1:]                      # the grid image comes first
    texts = json.loads(grid["info"])["infotexts"][1:]
    plain = generate(**BASE)
    am_off = generate(**BASE, **fam(am_enabled=False))
    on = generate(**BASE, **fam())
    order = [plain, plain, am_off, on]               # (λ 0, off) (λ .7, off) (λ 0, on) (λ .7, on)
    assert [same_pixels({"images": [c]}, want) for c, want in zip(cells, order)] == [True] * 4
    assert "FAM" not in settings(texts[0]) and settings(texts[3])["FAM AM lambda"] == "0.7"


def test_interrupt_leaves_nothing_behind():
    before = generate(**BASE)
    result = {}
    slow = {**BASE, "steps": 12, "hr_second_pass_steps": 12, **fam()}
    worker = threading.Thread(target=lambda: result.update(r=call("/sdapi/v1/txt2img", slow)))
    worker.start()
    deadline = time.time() + 120
    while time.time() < deadline:                   # interrupt inside the hires (FAM) pass
        if call("/sdapi/v1/progress?skip_current_image=true")[1]["progress"] > 0.6:
            break
        time.sleep(0.2)
    call("/sdapi/v1/interrupt", {})
    worker.join()
    assert result["r"][0] == 200
    assert same_pixels(before, generate(**BASE))


def test_plain_generation_after_fam_is_bit_identical():
    before = generate(**BASE)
    generate(**BASE, **fam())
    call("/sdapi/v1/txt2img", {**BASE, **fam(am_lambda=2)})         # a failed request too
    generate(**BASE, **fam(fm_enabled=False, am_enabled=False, full_renoise=False))
    after = generate(**BASE)
    assert same_pixels(before, after)


# ---- scripts that run process_images again on the same p ------------------------------------
def img2img_source(width=FIRST, height=FIRST):
    return generate(**{**BASE, "enable_hr": False, "width": width, "height": height})["images"][0]


def test_loopback_runs_fam_on_every_loop():
    body = {"init_images": [img2img_source()], "prompt": BASE["prompt"], "steps": 3,
            "width": UPSCALE, "height": UPSCALE, "sampler_name": "Euler", "seed": 5,
            "denoising_strength": 0.6, "script_name": "loopback",
            "script_args": [2, 0.5, "Linear", "None"], **fam()}
    r = generate("/sdapi/v1/img2img", **body)
    sizes = [im.size for im in pixels(r)]
    assert sizes.count((UPSCALE, UPSCALE)) == 2               # one per loop (+ the grid)
    assert settings(infotext(r))["FAM AM path"] == "recompute"


def test_img2img_batch_of_two_images_through_sd_upscale():
    """SD upscale is the API's img2img Batch: one p, and per batch new init images (here the
    two tiles of a 2x1 grid) and process_images again."""
    tile = UPSCALE
    source = img2img_source(tile - 32, tile // 2)              # x2 (Lanczos): two tiles of `tile`
    body = {"init_images": [source], "prompt": BASE["prompt"], "steps": 3, "width": tile,
            "height": tile, "sampler_name": "Euler", "seed": 5, "denoising_strength": 0.5,
            "batch_size": 1, "script_name": "sd upscale",
            "script_args": [None, 64, "Lanczos", 2.0], **fam()}
    r = generate("/sdapi/v1/img2img", **body)
    assert [im.size for im in pixels(r)] == [(2 * (tile - 32), tile)]
    info = settings(infotext(r))
    assert info["FAM"] == "True" and "FAM AM skipped" not in info


def test_a_fam_error_leaves_the_server_log_quiet():
    """A user's bad argument is a 422 for the client and no traceback in the log."""
    if not LOG:
        pytest.skip("FAM_A1111_LOG is not set")
    start = os.path.getsize(LOG)
    status, r = call("/sdapi/v1/txt2img", {**BASE, **fam(am_lambda=1.5)})
    assert status == 422 and r["error"] == "FamRequestError" and "am_lambda" in r["detail"]
    status, r = call("/sdapi/v1/txt2img", {**BASE, **fam(), "enable_hr": False})
    assert status == 422 and "Hires. fix" in r["detail"]
    time.sleep(1)
    with open(LOG, encoding="utf-8", errors="replace") as f:
        f.seek(start)
        printed = f.read()
    assert "API error" not in printed and "Traceback" not in printed, printed[-2000:]


# ---- SDXL -------------------------------------------------------------------------------------
@pytest.mark.skipif(ARCH != "sdxl", reason="the loaded model is not SDXL")
def test_sdxl_hires_fix_and_img2img_with_fam():
    """Its 30 AM layers, and on the img2img (recompute) path native calls conditioned on
    the native size through the model's own size embedders."""
    r = generate(**BASE, **fam())
    info = settings(infotext(r))
    assert info["FAM"] == "True" and "FAM AM skipped" not in info and "FAM note" not in info
    body = {"init_images": [r["images"][0]], "prompt": BASE["prompt"], "steps": 3,
            "width": UPSCALE, "height": UPSCALE - 64, "sampler_name": "DPM++ 2M", "seed": 3}
    r = generate("/sdapi/v1/img2img", **body, **fam())
    info = settings(infotext(r))
    assert info["FAM AM path"] == "recompute" and "FAM AM skipped" not in info
    assert [im.size for im in pixels(r)] == [(UPSCALE, UPSCALE - 64)]
