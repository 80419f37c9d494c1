"""`python -m fam generate` end to end on tiny random-weight pipelines saved in temporary
folders: the PNGs, their A1111 `parameters` text, --compare, batches, and every bad input."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from fam.__main__ import main as fam_main  # noqa: E402
from fam.params import FamParams  # noqa: E402
from fam.standalone import cli, models  # noqa: E402
from fam.standalone.pngs import infotext  # noqa: E402
from tiny_pipeline import NATIVE_PX, save_sd15, save_sdxl  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--steps", "2", "--sampler", "Euler", "--quiet"]


@pytest.fixture(scope="session")
def sd15(tmp_path_factory):
    return save_sd15(str(tmp_path_factory.mktemp("models") / "tiny-sd15"))


@pytest.fixture(scope="session")
def sdxl(tmp_path_factory):
    return save_sdxl(str(tmp_path_factory.mktemp("models") / "tiny-sdxl"))


def generate(*args):
    return fam_main(["generate", *FAST, *args])


# The WebUI's reading of an infotext: prompt lines, "Negative prompt:" lines, and a last
# line of `key: value` pairs (values JSON-quoted when they hold , : or a newline).
PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text):
    *lines, last = text.strip().split("\n")
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for k, v in PAIR.findall(last):
        out[k] = json.loads(v) if v.startswith('"') and v.endswith('"') else v
    return out


def parameters(path):
    with Image.open(path) as im:
        return im.info["parameters"], im.size


def test_sd15_png_size_and_parameters_read_back(sd15, tmp_path):
    out = tmp_path / "fam.png"
    rc = generate("--model", sd15, "--prompt", "a lighthouse, storm: night", "--negative",
                  "blurry", "--seed", "5", "--scale", "2", "--fm-cutoff", "0.4",
                  "--am-lambda", "0.6", "--am-blocks", "3,4,5,6", "--no-record-offload",
                  "--out", str(out))
    assert rc == 0
    text, size = parameters(out)
    assert size == (2 * NATIVE_PX, 2 * NATIVE_PX)
    info = parse_infotext(text)
    assert info["Prompt"] == "a lighthouse, storm: night" and info["Negative prompt"] == "blurry"
    assert {k: info[k] for k in ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model",
                                 "Denoising strength", "Hires upscale", "Hires upscaler")} == {
        "Steps": "2", "Sampler": "Euler", "CFG scale": "7.0", "Seed": "5",
        "Size": f"{NATIVE_PX}x{NATIVE_PX}", "Model": "tiny-sd15", "Denoising strength": "1.0",
        "Hires upscale": "2.0", "Hires upscaler": "Latent (bicubic)"}
    assert FamParams.from_infotext(info) == FamParams(
        enabled=True, fm_cutoff=0.4, am_lambda=0.6, am_blocks="3,4,5,6", record_offload=False)


def test_same_seed_reproduces_and_defaults_are_the_models(sd15, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert generate("--model", sd15, "--seed", "9", "--out", str(a)) == 0
    assert generate("--model", sd15, "--seed", "9", "--out", str(b)) == 0
    assert Image.open(a).tobytes() == Image.open(b).tobytes()
    info = parse_infotext(parameters(a)[0])
    assert info["Prompt"] == "" and info["Size"] == f"{NATIVE_PX}x{NATIVE_PX}"


def test_compare_writes_both_images_and_a_labelled_sheet(sd15, tmp_path, capsys):
    out = tmp_path / "cmp.png"
    assert generate("--model", sd15, "--seed", "1", "--compare", "--out", str(out)) == 0
    fam, plain, sheet = (tmp_path / n for n in ("cmp.png", "cmp_hiresfix.png", "cmp_compare.png"))
    fam_im, plain_im = Image.open(fam), Image.open(plain)
    assert fam_im.size == plain_im.size == (2 * NATIVE_PX, 2 * NATIVE_PX)
    assert fam_im.tobytes() != plain_im.tobytes()
    w, h = Image.open(sheet).size                     # native | Hires fix | FAM
    assert w == 3 * fam_im.size[0] and h > fam_im.size[1]
    plain_info = parse_infotext(parameters(plain)[0])
    assert plain_info["Seed"] == "1" and not any(k.startswith("FAM") for k in plain_info)
    assert FamParams.from_infotext(parse_infotext(parameters(fam)[0])) == FamParams(enabled=True)
    printed = capsys.readouterr().out
    assert re.search(r"^FAM +[\d.]+ s .*peak RSS", printed, re.M)
    assert re.search(r"^Hires fix +[\d.]+ s .*peak RSS", printed, re.M)
    assert "FAM / Hires fix: time" in printed


def test_default_model_is_the_shipped_toy_offline(tmp_path, capsys, monkeypatch):
    """No --model: the toy model in the package, no network, a real FAM-vs-Hires-fix sheet."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "toy.png"
    assert fam_main(["generate", "--steps", "3", "--seed", "4", "--compare", "--quiet",
                     "--prompt", "ignored", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "toy-disc" in printed and "--prompt and --negative are ignored" in printed
    fam_im, plain_im = Image.open(out), Image.open(tmp_path / "toy_hiresfix.png")
    assert fam_im.size == plain_im.size == (64, 64)
    assert fam_im.tobytes() != plain_im.tobytes()
    assert Image.open(tmp_path / "toy_compare.png").width == 3 * 256   # enlarged panels
    info = parse_infotext(parameters(out)[0])
    assert info["Prompt"] == "" and info["Model"] == "toy-disc" and info["Size"] == "32x32"
    assert info["Sampler"] == "Euler" and info["CFG scale"] == "1.0"
    assert FamParams.from_infotext(info) == FamParams(enabled=True)


def test_plain_hires_fix_at_its_own_strength_and_a_batch_sheet(sd15, tmp_path):
    out = tmp_path / "s.png"
    assert generate("--model", sd15, "--seed", "2", "--compare", "--denoising-strength", "0.5",
                    "--batch", "2", "--out", str(out)) == 0
    for i in (0, 1):
        assert parse_infotext(parameters(tmp_path / f"s-{i}_hiresfix.png")[0])["Denoising strength"] == "0.5"
        assert parse_infotext(parameters(tmp_path / f"s-{i}.png")[0])["Denoising strength"] == "1.0"
    sheet = Image.open(tmp_path / "s_compare.png")          # one row per image
    assert sheet.width == 6 * NATIVE_PX and 4 * NATIVE_PX < sheet.height < 5 * NATIVE_PX
    assert generate("--model", sd15, "--seed", "2", "--denoising-strength", "0.5",
                    "--no-full-renoise", "--out", str(out)) == 0
    assert parse_infotext(parameters(out)[0])["Denoising strength"] == "0.5"


def test_sdxl_batch_images_are_their_seeds_images(sdxl, tmp_path):
    out = tmp_path / "xl.png"
    assert generate("--model", sdxl, "--prompt", "a cat", "--seed", "40", "--batch", "2",
                    "--scale", "1.5", "--out", str(out)) == 0
    first, second = tmp_path / "xl-0.png", tmp_path / "xl-1.png"
    assert Image.open(first).size == (int(1.5 * NATIVE_PX),) * 2
    assert [parse_infotext(parameters(p)[0])["Seed"] for p in (first, second)] == ["40", "41"]
    single = tmp_path / "one.png"
    assert generate("--model", sdxl, "--prompt", "a cat", "--seed", "41", "--scale", "1.5",
                    "--out", str(single)) == 0
    def diff(a, b):  # batched and single-row float math may differ in the last bits
        import numpy as np
        return np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16)).max()
    assert diff(single, second) <= 2 and diff(single, first) > 20


def test_v_prediction_model_and_samplers(tmp_path):
    folder = save_sd15(str(tmp_path / "tiny-v"), prediction_type="v_prediction")
    model = models.load_model(folder, device=torch.device("cpu"), dtype=torch.float32)
    assert model.kind.endswith("v-prediction")
    for name in models.SAMPLERS:
        sampler = models.make_sampler(model, name)
        assert sampler.config.prediction_type == "v_prediction"
    assert models.make_sampler(model, "DPM++ 2M Karras").config.use_karras_sigmas
    assert models.make_sampler(model, "Euler", "epsilon").config.prediction_type == "epsilon"
    out = tmp_path / "v.png"
    assert generate("--model", folder, "--sampler", "Euler a", "--seed", "3",
                    "--out", str(out)) == 0
    assert parse_infotext(parameters(out)[0])["Sampler"] == "Euler a"


def test_karras_schedule_type_and_long_prompts(sd15, tmp_path, capsys):
    out = tmp_path / "k.png"
    long_prompt = "a " * 80      # 80 tokens + start + end; the window is 77
    assert fam_main(["generate", "--model", sd15, "--steps", "2", "--quiet", "--seed", "1",
                     "--prompt", long_prompt, "--out", str(out)]) == 0
    info = parse_infotext(parameters(out)[0])
    assert (info["Sampler"], info["Schedule type"]) == ("DPM++ 2M", "Karras")
    assert info["Prompt"] == long_prompt.strip()
    assert "the prompt is longer than the text encoder's window; its last 5 tokens are cut off" \
        in capsys.readouterr().out


def test_vae_tiling_on_and_the_automatic_rule(sd15, tmp_path, monkeypatch, capsys):
    whole, tiled = tmp_path / "whole.png", tmp_path / "tiled.png"
    assert generate("--model", sd15, "--seed", "4", "--vae-tiling", "off", "--out", str(whole)) == 0
    assert generate("--model", sd15, "--seed", "4", "--vae-tiling", "on", "--out", str(tiled)) == 0
    assert Image.open(tiled).size == Image.open(whole).size
    assert Image.open(tiled).tobytes() != Image.open(whole).tobytes()   # tiles were blended
    monkeypatch.setattr(models, "free_bytes", lambda device: 1024)
    capsys.readouterr()
    assert generate("--model", sd15, "--seed", "4", "--out", str(tmp_path / "auto.png")) == 0
    assert "VAE tiling on: decoding 256x256 needs about" in capsys.readouterr().out
    assert Image.open(tmp_path / "auto.png").tobytes() == Image.open(tiled).tobytes()


def test_decode_estimate_scales_with_pixels_and_dtype():
    vae = type("V", (), {"config": type("C", (), {"block_out_channels": (128, 256)}),
                         "dtype": torch.float16})()
    assert models.decode_bytes(vae, 1024, 1024) == 8 * 128 * 2 * 1024 * 1024
    vae.dtype = torch.float32
    assert models.decode_bytes(vae, 2048, 1024) == 4 * models.decode_bytes(vae, 1024, 512)


def test_infotext_quotes_like_the_webui():
    text = infotext("a, b", "", {"Steps": 3, "FAM AM blocks": "3,4", "Model": None, "X": "p: q"})
    assert text == 'a, b\nSteps: 3, FAM AM blocks: "3,4", X: "p: q"'
    assert parse_infotext(text)["FAM AM blocks"] == "3,4"


# ---- bad inputs: a message naming the problem, a non-zero exit, no traceback ----------------
def fails(capsys, *args, code=None):
    rc = generate(*args)
    err = capsys.readouterr().err
    assert rc != 0 and (code is None or rc == code), (rc, err)
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: "), err
    return err


@pytest.mark.parametrize("flags, message", [
    (["--am-lambda", "1.5"], "FAM setting 'am_lambda' = 1.5 is invalid: expected a number in [0.0, 1.0]"),
    (["--fm-cutoff", "big"], "FAM setting 'fm_cutoff' = 'big' is invalid: expected a number"),
    (["--record-budget-mb", "10.5"], "FAM setting 'record_budget_mb' = 10.5 is invalid: expected an integer"),
    (["--am-blocks", "3,x"], "FAM setting 'am_blocks' = '3,x' is invalid: expected 'auto' or comma-separated"),
    (["--am-blocks", "３,٤"], "FAM setting 'am_blocks' = '３,٤' is invalid: expected 'auto' or comma-separated"),
    (["--record-budget-mb", "1e400"], "FAM setting 'record_budget_mb' = inf is invalid: expected an integer"),
    (["--fm-cutoff=nan"], "FAM setting 'fm_cutoff' = 'nan' is invalid: expected a number"),
    (["--width", "130"], "--width 130: expected a positive multiple of 8"),
    (["--height", "0"], "--height 0: expected a positive multiple of 8"),
    (["--scale", "5"], "--scale 5: expected 1.5 to 4"),
    (["--steps", "0"], "--steps 0: expected 1 to 1000"),
    (["--denoising-strength", "0"], "--denoising-strength 0: expected more than 0"),
    (["--out", "x.jpg"], "--out x.jpg: expected a .png file name"),
    (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
])
def test_bad_settings_fail_before_loading(capsys, flags, message):
    assert message in fails(capsys, "--model", "/nonexistent/never-loaded", *flags, code=2)


def test_am_blocks_the_model_does_not_have(sd15, capsys):
    err = fails(capsys, "--model", sd15, "--am-blocks", "0", code=2)
    assert "FAM AM blocks [0] have no self-attention in tiny-sd15; output blocks with attention: " \
        "[3, 4, 5, 6, 7, 8, 9, 10, 11]" in err


def test_missing_and_unusable_models(capsys, tmp_path):
    assert "no such file or folder" in fails(capsys, "--model", str(tmp_path / "nope"), code=1)
    assert "unknown toy world 'nope'; choose from 'disc' (1), 'stripes' (2)" in fails(
        capsys, "--model", "toy:nope", code=1)
    (tmp_path / "empty").mkdir()
    assert "has no model_index.json" in fails(capsys, "--model", str(tmp_path / "empty"))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{}")
    assert "holds a single model, not a pipeline" in fails(capsys, "--model", str(tmp_path / "unet"))
    (tmp_path / "x.txt").write_text("")
    assert "must end in .safetensors" in fails(capsys, "--model", str(tmp_path / "x.txt"))


def test_hub_id_offline(capsys, monkeypatch, tmp_path):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    err = fails(capsys, "--model", "someone/no-such-model", code=1)
    assert "someone/no-such-model: not a local file or folder; looked up on the Hugging Face Hub" in err
    assert "offline mode is on (HF_HUB_OFFLINE=1)" in err


def test_non_unet_pipeline_folder(capsys, tmp_path):
    (tmp_path / "flux").mkdir()
    (tmp_path / "flux" / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "X"]}))
    err = fails(capsys, "--model", str(tmp_path / "flux"), code=1)
    assert "FAM needs a UNet model (SD1.x, SD2.x, SDXL)" in err and "FluxPipeline" in err
    (tmp_path / "refiner").mkdir()
    (tmp_path / "refiner" / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionXLImg2ImgPipeline", "unet": ["diffusers", "U"],
        "vae": ["diffusers", "V"], "text_encoder": [None, None], "tokenizer": [None, None],
        "text_encoder_2": ["transformers", "T"]}))
    assert "has no text_encoder, tokenizer" in fails(capsys, "--model", str(tmp_path / "refiner"))


def _safetensors(path, tensors):
    from safetensors.torch import save_file
    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, str(path))
    return str(path)


def test_non_unet_and_non_model_single_files(capsys, tmp_path):
    flux = _safetensors(tmp_path / "flux.safetensors", {
        "double_blocks.0.img_attn.norm.key_norm.scale": (4,), "img_in.weight": (8, 64),
        "guidance_in.in_layer.bias": (8,)})
    assert "FAM needs a UNet model (SD1.x, SD2.x, SDXL)" in fails(capsys, "--model", flux, code=1)
    sd3 = _safetensors(tmp_path / "sd3.safetensors", {
        "joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,), "pos_embed": (1, 36864, 1)})
    assert "is a sd3 checkpoint" in fails(capsys, "--model", sd3, code=1)
    lora = _safetensors(tmp_path / "lora.safetensors", {"lora_unet_x.lora_up.weight": (4, 4)})
    assert "has no UNet weights" in fails(capsys, "--model", lora, code=1)
    inpaint = _safetensors(tmp_path / "inpaint.ckpt.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": (8, 9, 3, 3)})
    assert "is an SD1.x inpainting model" in fails(capsys, "--model", inpaint, code=1)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    assert "could not load" in fails(capsys, "--model", str(broken), code=1)


def test_single_file_offline_needs_a_config(capsys, monkeypatch, tmp_path):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    ckpt = _safetensors(tmp_path / "sd1.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3)})
    err = fails(capsys, "--model", ckpt, code=1)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in err and "pass --config" in err


def test_cli_subprocess_errors_without_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "fam", "generate", "--model", str(tmp_path / "x"),
                        "--am-lambda", "2"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == ("error: FAM setting 'am_lambda' = 2.0 is invalid: expected a "
                                "number in [0.0, 1.0]")
    r = subprocess.run([sys.executable, "-m", "fam"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "generate" in r.stderr


def test_help_lists_every_fam_setting(capsys):
    with pytest.raises(SystemExit) as e:
        fam_main(["generate", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--fm", "--no-fm", "--fm-cutoff", "--am", "--no-am", "--am-lambda", "--am-blocks",
                 "--full-renoise", "--no-full-renoise", "--record-budget-mb", "--record-offload",
                 "--compare", "--vae-tiling", "--config"):
        assert re.search(rf"(^|[\s,]){re.escape(flag)}\b", text), flag
    assert len([f for f in FamParams.names() if f != "enabled"]) == len(cli._fam_fields())


def test_single_file_checkpoint_offline_with_config(sd15, tmp_path, monkeypatch):
    """An original-layout checkpoint of the tiny pipeline, loaded offline with --config, makes
    the same image as the pipeline folder it was written from."""
    from diffusers import StableDiffusionPipeline
    from huggingface_hub import constants
    from safetensors.torch import save_file
    from ldm_checkpoint import ldm_state_dict
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    ckpt = tmp_path / "tiny-sd15.safetensors"
    save_file(ldm_state_dict(StableDiffusionPipeline.from_pretrained(sd15)), str(ckpt))
    config = tmp_path / "config-only"          # the folder's .json and tokenizer files, no weights
    shutil.copytree(sd15, config, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    from_folder, from_file = tmp_path / "folder.png", tmp_path / "file.png"
    assert generate("--model", sd15, "--seed", "6", "--out", str(from_folder)) == 0
    assert generate("--model", str(ckpt), "--config", str(config), "--seed", "6",
                    "--out", str(from_file)) == 0
    assert Image.open(from_file).tobytes() == Image.open(from_folder).tobytes()
    assert parse_infotext(parameters(from_file)[0])["Model"] == "tiny-sd15"


def test_side_by_side_labels_and_enlarges_small_images():
    from fam.standalone.pngs import side_by_side
    red, blue = Image.new("RGB", (64, 48), "red"), Image.new("RGB", (64, 48), "blue")
    sheet = side_by_side([([red, blue], "Hires fix", "x"), ([blue, red], "FAM", "y")])
    assert sheet.width == 2 * 256 and sheet.height > 2 * 48 * 4
    assert sheet.getpixel((10, sheet.height - 1)) == (0, 0, 255)          # column 0, row 1
    assert sheet.getpixel((256 + 10, sheet.height - 1)) == (255, 0, 0)    # column 1, row 1
    assert sheet.getpixel((10, sheet.height - 1 - 192)) == (255, 0, 0)    # column 0, row 0
    big = side_by_side([([Image.new("RGB", (300, 200))], "a", "b")] * 2)
    assert big.width == 600 and 200 < big.height < 300
