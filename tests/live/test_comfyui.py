"""Against a running ComfyUI with this folder in `custom_nodes/` and an SD1.x checkpoint;
skipped unless FAM_COMFYUI_URL is set, e.g.

    FAM_COMFYUI_URL=http://127.0.0.1:8188 python -m pytest -q tests/live/test_comfyui.py

Standard library only (runs in ComfyUI's own Python or any other). Options:
  FAM_COMFYUI_SD15        SD1.x checkpoint name (default: the docs workflows' v1-5-pruned-emaonly)
  FAM_COMFYUI_SDXL        SDXL checkpoint name (default: the docs workflow's; its case is skipped
                          when ComfyUI does not list it)
  FAM_COMFYUI_CONTROLNET  an SD1.x ControlNet name (the ControlNet case is skipped without it)
  FAM_COMFYUI_LORA        an SD1.x LoRA name (the LoRA case is skipped without it)
  FAM_COMFYUI_SIZE, FAM_COMFYUI_STEPS   native size and steps per pass (128, 2: a CPU runs
                          the high-res pass of a full-size SD1.5 at 256² in about a minute)
  FAM_COMFYUI_LOG         the server's log file: checks no FAM run logged a skipped ControlNet

Every workflow is queued through POST /prompt and followed through GET /history; latents
come back as the files SaveLatent writes (read with the standard library), images as PNGs.
Each job runs once per session and is shared between tests."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
from pathlib import Path

import pytest

URL = os.environ.get("FAM_COMFYUI_URL", "").rstrip("/")
pytestmark = pytest.mark.skipif(not URL, reason="FAM_COMFYUI_URL is not set")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "comfyui"
SD15 = os.environ.get("FAM_COMFYUI_SD15", "v1-5-pruned-emaonly.safetensors")
SDXL = os.environ.get("FAM_COMFYUI_SDXL", "sd_xl_base_1.0.safetensors")
CONTROLNET = os.environ.get("FAM_COMFYUI_CONTROLNET", "")
LORA = os.environ.get("FAM_COMFYUI_LORA", "")
SIZE = int(os.environ.get("FAM_COMFYUI_SIZE", "128"))
STEPS = int(os.environ.get("FAM_COMFYUI_STEPS", "2"))
SEED, CFG = 7, 7.0
FAM_NODES = ("FAMHiresSampler", "FAMHiresPass", "FAMSettings")


# ---- HTTP ------------------------------------------------------------------------------------
def http(method: str, path: str, body=None, timeout: float = 60):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(URL + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, raw
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post(path: str, body) -> tuple[int, dict]:
    code, raw = http("POST", path, body)
    return code, (json.loads(raw) if raw else {})


class Job:
    """One queued workflow: its HTTP answer, and once finished its history entry."""

    def __init__(self, workflow: dict, interrupt_after: float | None = None, timeout=3600):
        t0 = time.monotonic()
        self.code, self.answer = post("/prompt", {"prompt": workflow,
                                                  "client_id": str(uuid.uuid4())})
        self.history: dict = {}
        if self.code != 200:
            return
        pid = self.answer["prompt_id"]
        interrupted = False
        while time.monotonic() - t0 < timeout:
            if interrupt_after is not None and not interrupted and time.monotonic() - t0 > interrupt_after:
                post("/interrupt", {})
                interrupted = True
            code, raw = http("GET", f"/history/{pid}")
            entry = json.loads(raw).get(pid) if code == 200 else None
            status = (entry or {}).get("status", {})
            if status.get("completed") or status.get("status_str") in ("success", "error"):
                self.history, self.seconds = entry, time.monotonic() - t0
                return
            time.sleep(0.5)
        raise TimeoutError(f"ComfyUI did not finish a prompt in {timeout} s")

    @property
    def status(self) -> str:
        return self.history.get("status", {}).get("status_str", "")

    def messages(self) -> str:
        """The history's messages as one text (upstream stores [event, data] pairs, some
        packagings strings)."""
        return json.dumps(self.history.get("status", {}).get("messages", []))

    def files(self, node: str, kind: str) -> list[bytes]:
        out = self.history.get("outputs", {}).get(node, {}).get(kind, [])
        return [view(f) for f in out]

    def latents(self, node: str) -> list[tuple[list[int], str, str]]:
        return [latent_tensor(raw) for raw in self.files(node, "latents")]

    def image_sizes(self, node: str) -> list[tuple[int, int]]:
        return [struct.unpack(">II", raw[16:24]) for raw in self.files(node, "images")]


def view(f: dict) -> bytes:
    q = urllib.parse.urlencode({"filename": f["filename"], "subfolder": f.get("subfolder", ""),
                                "type": f.get("type", "output")})
    code, raw = http("GET", f"/view?{q}")
    assert code == 200, f"/view {f}: HTTP {code}"
    return raw


def latent_tensor(raw: bytes) -> tuple[list[int], str, str]:
    """(shape, dtype, sha256 of the bytes) of `latent_tensor` in a SaveLatent file
    (safetensors): equal means bit-identical."""
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    info = header["latent_tensor"]
    begin, end = info["data_offsets"]
    return info["shape"], info["dtype"], hashlib.sha256(raw[8 + n + begin:8 + n + end]).hexdigest()


def fresh() -> None:
    """Drop ComfyUI's node cache (and unload the models), so the next job really runs."""
    assert post("/free", {"unload_models": True, "free_memory": True})[0] == 200
    time.sleep(3)   # the worker applies the flags between prompts, at its next poll


@functools.cache
def object_info() -> dict:
    code, raw = http("GET", "/object_info")
    assert code == 200
    return json.loads(raw)


def checkpoints() -> list[str]:
    return object_info()["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]


# ---- workflows -------------------------------------------------------------------------------
def fam_widgets(**over) -> dict:
    """Every FAM widget at the default the node shows."""
    spec = object_info()["FAMSettings"]["input"]["required"]
    return {**{k: v[1]["default"] for k, v in spec.items()}, **over}


def base(ckpt: str = SD15, batch: int = 1) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse on a cliff",
                                                         "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE,
                                                           "batch_size": batch}},
    }


def sampling(**over) -> dict:
    return {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "seed": SEED,
            "steps": STEPS, "cfg": CFG, "sampler_name": "euler", "scheduler": "normal", **over}


def save(wf: dict, node: str, source: list, image: bool = True) -> dict:
    """SaveLatent (node) of `source`, and its decoded image (node + "i")."""
    wf[node] = {"class_type": "SaveLatent", "inputs": {"samples": source,
                                                        "filename_prefix": f"famtest/{node}"}}
    if image:
        wf[node + "d"] = {"class_type": "VAEDecode", "inputs": {"samples": source, "vae": ["1", 2]}}
        wf[node + "i"] = {"class_type": "SaveImage", "inputs": {"images": [node + "d", 0],
                                                                 "filename_prefix": f"famtest/{node}"}}
    return wf


def fam_workflow(batch=1, hires_denoise=0.5, control=False, lora=False, **fam) -> dict:
    wf = base(batch=batch)
    if lora:   # LoraLoader between the checkpoint and everything that uses it
        wf["1l"] = {"class_type": "LoraLoader", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": LORA, "strength_model": 1.0,
            "strength_clip": 1.0}}
        for key in ("2", "3"):
            wf[key]["inputs"]["clip"] = ["1l", 1]
    wf["5"] = {"class_type": "FAMHiresSampler", "inputs": sampling(
        latent_image=["4", 0], scale=2.0, denoise=1.0, hires_steps=STEPS,
        hires_denoise=hires_denoise, **fam_widgets(**fam))}
    if lora:
        wf["5"]["inputs"]["model"] = ["1l", 0]
    if control:
        with_control(wf, "5")
    save(wf, "hires", ["5", 0])
    return save(wf, "native", ["5", 1])


def plain_workflow(denoise=0.5, image=True) -> dict:
    """The plain two-KSampler Hires fix: KSampler, Upscale Latent By (bicubic) 2, KSampler."""
    wf = base()
    wf["5"] = {"class_type": "KSampler", "inputs": sampling(latent_image=["4", 0], denoise=1.0)}
    wf["6"] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["5", 0],
                                                           "upscale_method": "bicubic",
                                                           "scale_by": 2.0}}
    wf["7"] = {"class_type": "KSampler", "inputs": sampling(latent_image=["6", 0], denoise=denoise)}
    save(wf, "hires", ["7", 0], image)
    return save(wf, "native", ["5", 0], image)


def with_control(wf: dict, *samplers: str) -> dict:
    wf["20"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}}
    wf["21"] = {"class_type": "EmptyImage", "inputs": {"width": SIZE, "height": SIZE,
                                                       "batch_size": 1, "color": 0xFFFFFF}}
    wf["22"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["2", 0], "negative": ["3", 0], "control_net": ["20", 0], "image": ["21", 0],
        "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    for node in samplers:
        wf[node]["inputs"].update(positive=["22", 0], negative=["22", 1])
    return wf


@functools.cache
def job(name: str) -> Job:
    """Each job once per session, in the order the tests first ask for them; "plain" and
    "plain_again" run on a freshly emptied cache so they really sample."""
    if name in ("plain", "plain_again"):
        fresh()
        return Job(plain_workflow())
    if name == "interrupted":
        job("plain")
        wf = fam_workflow(hires_denoise=0.5)
        wf["5"]["inputs"].update(steps=STEPS * 20, hires_steps=STEPS * 20)
        return Job(wf, interrupt_after=float(os.environ.get("FAM_COMFYUI_INTERRUPT_AFTER", "20")))
    jobs = {
        "fam": lambda: fam_workflow(),
        "fam_off": lambda: fam_workflow(enabled=False),
        "fam_batch2": lambda: fam_workflow(batch=2, am_lambda=0.5),
        "fam_control": lambda: fam_workflow(control=True),
        "fam_lora": lambda: fam_workflow(lora=True),
    }
    return Job(jobs[name]())


def finished(j: Job) -> Job:
    assert j.code == 200, j.answer
    assert j.status == "success", j.messages()
    return j


# ---- the nodes ---------------------------------------------------------------------------------
def test_the_nodes_are_loaded_with_their_inputs():
    info = object_info()
    for name in FAM_NODES:
        assert name in info, f"{name} missing: is this folder in ComfyUI's custom_nodes?"
    sampler = info["FAMHiresSampler"]["input"]
    assert {"model", "positive", "negative", "latent_image", "seed", "steps", "cfg",
            "sampler_name", "scheduler", "scale", "am_lambda", "fm_cutoff"} <= set(sampler["required"])
    assert sampler["required"]["scale"][1]["min"] == 1.5 and sampler["required"]["scale"][1]["max"] == 4.0
    assert "sa_solver" not in sampler["required"]["sampler_name"][0]
    assert info["FAMHiresSampler"]["display_name"] == "FAM Hires Sampler"
    assert info["FAMHiresSampler"]["output_name"] == ["hires", "native"]


def test_output_sizes():
    j = finished(job("fam"))
    assert j.image_sizes("hiresi") == [(2 * SIZE, 2 * SIZE)]
    assert j.image_sizes("nativei") == [(SIZE, SIZE)]
    ((shape, dtype, _),) = j.latents("hires")
    assert shape == [1, 4, SIZE // 4, SIZE // 4] and dtype == "F32"


def test_batch_of_two():
    j = finished(job("fam_batch2"))
    assert j.image_sizes("hiresi") == [(2 * SIZE, 2 * SIZE)] * 2
    ((shape, _, _),) = j.latents("hires")
    assert shape == [2, 4, SIZE // 4, SIZE // 4]


def test_fam_off_is_the_plain_two_ksampler_hires_fix_and_fam_differs_from_it():
    plain, off, fam = finished(job("plain")), finished(job("fam_off")), finished(job("fam"))
    assert off.latents("native") == plain.latents("native")
    assert off.latents("hires") == plain.latents("hires")
    assert fam.latents("native") == plain.latents("native")   # the native pass is the same
    assert fam.latents("hires") != plain.latents("hires")


def test_an_interrupted_fam_run_leaves_no_patch_behind():
    j = job("interrupted")
    assert j.code == 200 and j.status == "error", j.messages()
    assert "interrupt" in j.messages().lower()
    again = finished(job("plain_again"))
    assert again.latents("hires") == finished(job("plain")).latents("hires")


def test_a_plain_workflow_after_fam_ones_is_bit_identical():
    for name in ("fam", "fam_off", "fam_batch2", "interrupted"):
        job(name)
    again, plain = finished(job("plain_again")), finished(job("plain"))
    assert again.latents("hires") == plain.latents("hires")
    assert again.latents("native") == plain.latents("native")


@pytest.mark.skipif(not CONTROLNET, reason="FAM_COMFYUI_CONTROLNET is not set")
def test_controlnet_and_fam():
    j, fam = finished(job("fam_control")), finished(job("fam"))
    assert j.image_sizes("hiresi") == [(2 * SIZE, 2 * SIZE)]
    assert j.latents("hires") != fam.latents("hires")
    log = os.environ.get("FAM_COMFYUI_LOG")
    if log:
        assert "control could not be applied" not in Path(log).read_text(errors="replace")


@pytest.mark.skipif(not LORA, reason="FAM_COMFYUI_LORA is not set")
def test_lora_and_fam():
    j, fam = finished(job("fam_lora")), finished(job("fam"))
    assert j.image_sizes("hiresi") == [(2 * SIZE, 2 * SIZE)]
    if j.latents("native") == fam.latents("native"):   # the native pass is a plain KSampler's
        pytest.skip("the LoRA does not change even the native pass in this ComfyUI")
    assert j.latents("hires") != fam.latents("hires")


def test_every_listed_sampler_and_scheduler_runs_with_fam():
    """Each sampler and each scheduler of the node's lists, at 64² -> 128² (about 10 s a run
    on a CPU): finished, the right size, and (for the samplers) not the plain result. One
    that fails with FAM off as well is broken in this ComfyUI, not by FAM: reported, not
    failed."""
    spec = object_info()["FAMHiresSampler"]["input"]["required"]
    runs = [(s, "normal") for s in spec["sampler_name"][0]]
    runs += [("euler", s) for s in spec["scheduler"][0] if s != "normal"]

    def run(sampler, scheduler, enabled):
        wf = base()
        wf["4"]["inputs"].update(width=64, height=64)
        wf["5"] = {"class_type": "FAMHiresSampler", "inputs": sampling(
            latent_image=["4", 0], sampler_name=sampler, scheduler=scheduler, scale=2.0,
            denoise=1.0, hires_steps=STEPS, hires_denoise=0.5, **fam_widgets(enabled=enabled))}
        return Job(save(wf, "hires", ["5", 0], image=False))

    failed, broken = {}, {}
    for sampler, scheduler in runs:
        key = (sampler, scheduler)
        fam = run(sampler, scheduler, True)
        if fam.code != 200 or fam.status != "success":
            plain = run(sampler, scheduler, False)
            ok = plain.code == 200 and plain.status == "success"
            (failed if ok else broken)[key] = fam.messages()[-300:] or fam.answer
            continue
        if fam.latents("hires")[0][0] != [1, 4, 16, 16]:
            failed[key] = f"shape {fam.latents('hires')[0][0]}"
        elif scheduler == "normal" and run(sampler, scheduler, False).latents("hires") == fam.latents("hires"):
            failed[key] = "FAM gave the plain result"
    if broken:
        warnings.warn(f"broken in this ComfyUI with FAM off too: {broken}")
    assert not failed, failed


# ---- refusals ----------------------------------------------------------------------------------
def refused(wf: dict) -> tuple[str, str]:
    """(input names, messages) of a 400 answer's node errors."""
    code, answer = post("/prompt", {"prompt": wf, "client_id": str(uuid.uuid4())})
    assert code == 400, answer
    errors = [e for node in answer.get("node_errors", {}).values() for e in node["errors"]]
    assert errors, answer
    return " ".join(e.get("details", "") for e in errors), " ".join(e["message"] for e in errors)


@pytest.mark.parametrize("node, key, value", [
    ("5", "scale", 5.0), ("5", "scale", 1.0), ("5", "fm_cutoff", 2.0), ("5", "am_lambda", -0.1),
    ("5", "record_budget_mb", -1), ("5", "sampler_name", "sa_solver"),
    ("5", "sampler_name", "nope"), ("5", "steps", 0), ("5", "am_blocks", "up"),
    ("5", "am_blocks", "3,x"), ("5", "hires_denoise", 1.5)])
def test_bad_values_are_rejected_naming_the_input(node, key, value):
    wf = fam_workflow()
    wf[node]["inputs"][key] = value
    details, _ = refused(wf)
    assert key in details


def test_a_missing_input_is_rejected_naming_it():
    wf = fam_workflow()
    del wf["5"]["inputs"]["am_lambda"]
    assert "am_lambda" in refused(wf)[0]


@pytest.mark.parametrize("edit, name", [
    ("lcm", "model"), ("mask", "latent_image")], ids=["lcm-model-sampling", "noise-mask"])
def test_what_only_the_run_can_see_stops_with_a_message_naming_the_input(edit, name):
    """A model or latent FAM cannot take is known only when the node runs: ComfyUI reports
    the node's one-line error, nothing is patched."""
    wf = fam_workflow()
    if edit == "lcm":
        wf["30"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0],
                                                                     "sampling": "lcm", "zsnr": False}}
        wf["5"]["inputs"]["model"] = ["30", 0]
    else:
        wf["30"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": SIZE, "height": SIZE}}
        wf["31"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["4", 0], "mask": ["30", 0]}}
        wf["5"]["inputs"]["latent_image"] = ["31", 0]
    j = Job(wf)
    assert j.code == 200 and j.status == "error"
    assert f"(input '{name}')" in j.messages(), j.messages()


# ---- the docs workflows ----------------------------------------------------------------------
def shipped(name: str) -> dict:
    return json.loads((DOCS / name).read_text())


def smaller(wf: dict, ckpt_map: dict) -> dict:
    """The shipped workflow with the native size and steps of this run (a CPU cannot run
    the shipped 512²/1024² at 20 steps in a test), and the checkpoint names mapped."""
    for node in wf.values():
        i = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            i["ckpt_name"] = ckpt_map.get(i["ckpt_name"], i["ckpt_name"])
        if node["class_type"] in ("EmptyLatentImage", "ImageScale"):
            i["width"] = i["height"] = SIZE
        if "steps" in i:
            i["steps"] = STEPS
        if "hires_steps" in i:
            i["hires_steps"] = STEPS
    return wf


def invalid_values(wf: dict) -> list[str]:
    """What ComfyUI's own validation would refuse in `wf` (missing required inputs, values
    out of range or not in a list), checked against /object_info without queueing it: the
    shipped workflows are too slow to run at their size on a CPU."""
    errors = []
    for node_id, node in wf.items():
        spec = object_info().get(node["class_type"])
        if spec is None:
            errors.append(f"{node_id}: unknown node {node['class_type']}")
            continue
        for key, (kind, *opts) in spec["input"]["required"].items():
            value = node["inputs"].get(key)
            if value is None:
                errors.append(f"{node_id}.{key}: missing")
            elif isinstance(value, list):
                continue   # a link: ComfyUI checks its type
            elif isinstance(kind, list):
                if key not in ("ckpt_name", "image") and value not in kind:
                    errors.append(f"{node_id}.{key}: {value!r} not in the list")
            elif kind in ("INT", "FLOAT") and opts:
                lo, hi = opts[0].get("min", -float("inf")), opts[0].get("max", float("inf"))
                if not lo <= value <= hi:
                    errors.append(f"{node_id}.{key}: {value} outside {lo}..{hi}")
    return errors


@pytest.mark.parametrize("name", sorted(p.name for p in DOCS.glob("*.api.json")))
def test_docs_workflows_are_valid_as_shipped_and_run(name):
    wf = shipped(name)
    assert not invalid_values(wf)
    mapped = {"v1-5-pruned-emaonly.safetensors": SD15, "sd_xl_base_1.0.safetensors": SDXL}
    ckpts = {mapped.get(n["inputs"]["ckpt_name"], n["inputs"]["ckpt_name"]) for n in wf.values()
             if n["class_type"] == "CheckpointLoaderSimple"}
    if not ckpts <= set(checkpoints()):
        pytest.skip(f"checkpoint {sorted(ckpts - set(checkpoints()))} not in this ComfyUI")
    j = finished(Job(smaller(wf, mapped)))
    for node, n in wf.items():
        if n["class_type"] == "SaveImage":
            sizes = j.image_sizes(node)
            assert sizes and all(min(s) >= SIZE for s in sizes), (node, sizes)
