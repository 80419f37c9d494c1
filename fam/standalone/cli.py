"""`python -m fam generate`: a FAM image from a diffusers model, optionally beside the plain
Hires fix made with the same seed, steps and upscaling (`--compare`).

Both are full generations on the same model: a native pass at the model's size, the native
latent upsampled (bicubic, "Latent (bicubic)" in A1111 terms) to the target size, then a
high-res pass, FAM-guided or plain. Every PNG carries A1111's `parameters` text."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import importlib.util
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..layers import LayerSelectionError, discover
from ..params import FamParamError, FamParams

__all__ = ["main", "build_parser"]

SCALE_RANGE = (1.5, 4.0)
HIRES_UPSCALER = "Latent (bicubic)"   # what `upsample_latent` does, in A1111's words


class UsageError(ValueError):
    """A command-line value the runner cannot use; the message names the option."""


# ---- command line -----------------------------------------------------------------------
def _flag(f: dataclasses.Field) -> str:
    name = f.name[: -len("_enabled")] if f.name.endswith("_enabled") else f.name
    return "--" + name.replace("_", "-")


def _fam_fields():
    return [f for f in dataclasses.fields(FamParams) if f.name != "enabled"]


def build_parser() -> argparse.ArgumentParser:
    from .models import DEFAULT_MODEL, SAMPLERS
    ap = argparse.ArgumentParser(
        prog="python -m fam generate",
        description="Generate a FAM Diffusion image (and, with --compare, the plain Hires fix "
                    "with the same seed) from an SD1.x, SD2.x or SDXL diffusers model, or from "
                    "the toy model shipped with this package (the default).")
    m = ap.add_argument_group("model")
    m.add_argument("--model", default=DEFAULT_MODEL,
                   help="a diffusers pipeline folder, a Hugging Face Hub id "
                   "(e.g. stable-diffusion-v1-5/stable-diffusion-v1-5), a single "
                   ".safetensors/.ckpt checkpoint (path or URL), or a toy model shipped with "
                   "this package: toy:disc, toy:stripes (tiny, 32x32, no text encoder; "
                   f"default {DEFAULT_MODEL})")
    m.add_argument("--config", help="single-file checkpoints only: a diffusers folder or Hub id "
                   "of the same architecture whose configuration (.json and tokenizer files, no "
                   "weights) describes it; default: diffusers' choice for the detected "
                   "architecture, from the Hub or the local Hugging Face cache")
    m.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                   help="override the model's prediction type (e.g. an SD2.x-base single file, "
                   "which diffusers configures as 768-v)")
    g = ap.add_argument_group("generation")
    g.add_argument("--prompt", default="", help="the prompt (default: empty)")
    g.add_argument("--negative", default="", help="the negative prompt")
    g.add_argument("--steps", type=int, help="sampling steps of the native pass (default 20)")
    g.add_argument("--hires-steps", type=int, default=0,
                   help="steps of the high-res pass (default 0 = the same as --steps)")
    g.add_argument("--cfg", type=float, help="CFG scale (default 7)")
    g.add_argument("--seed", type=int, default=-1,
                   help="seed of the first image; image i of a batch uses seed + i (default -1: random)")
    g.add_argument("--width", type=int, help="native width, a multiple of 8 (default: the model's)")
    g.add_argument("--height", type=int, help="native height, a multiple of 8 (default: the model's)")
    g.add_argument("--scale", type=float, default=2.0,
                   help=f"upscale factor of the high-res pass, {SCALE_RANGE[0]:g} to "
                   f"{SCALE_RANGE[1]:g} (default 2)")
    g.add_argument("--sampler", choices=list(SAMPLERS), help="sampler (default DPM++ 2M Karras)")
    g.add_argument("--denoising-strength", type=float, default=1.0,
                   help="denoising strength of the plain Hires fix, and of the FAM pass with "
                   "--no-full-renoise (default 1.0)")
    g.add_argument("--batch", type=int, default=1, help="images per run (default 1)")
    r = ap.add_argument_group("running")
    r.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    r.add_argument("--dtype", default="auto", choices=("auto", "float16", "bfloat16", "float32"),
                   help="auto: float16 on a GPU, float32 on the CPU")
    r.add_argument("--vae-tiling", default="auto", choices=("auto", "on", "off"),
                   help="tiled VAE decode; auto: on when the whole decode would not fit in the "
                   "free memory (CUDA and CPU)")
    r.add_argument("--compare", action="store_true",
                   help="also make the plain Hires fix with the same seed, steps and upscaling: "
                   "writes OUT_hiresfix.png and a labelled OUT_compare.png (native | Hires fix | "
                   "FAM, one row per image), prints both timings")
    r.add_argument("--out", default="fam.png", help="output PNG (default fam.png); a batch "
                   "writes OUT-0.png, OUT-1.png, ...")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    f = ap.add_argument_group("FAM settings (the WebUI's and the API's; default in brackets)")
    for fld in _fam_fields():
        doc = f"{fld.metadata['doc']} [{fld.default}]".replace("%", "%%")
        if fld.type in ("bool", bool):
            f.add_argument(_flag(fld), dest=fld.name, action=argparse.BooleanOptionalAction,
                           default=None, help=doc)
        else:
            f.add_argument(_flag(fld), dest=fld.name, metavar="VALUE", default=None, help=doc)
    return ap


def fam_params(args: argparse.Namespace) -> FamParams:
    """FAM on, with the flags given: parsed and checked exactly as the WebUI's infotext and
    API values are (FamParamError names the setting and its allowed values)."""
    entries = {"FAM": True}
    for f in _fam_fields():
        value = getattr(args, f.name)
        if value is not None:
            entries[f.metadata["infotext"]] = value
    return FamParams.from_infotext(entries)


def _check(args: argparse.Namespace) -> None:
    if args.steps is not None and not 1 <= args.steps <= 1000:
        raise UsageError(f"--steps {args.steps}: expected 1 to 1000")
    if not 0 <= args.hires_steps <= 1000:
        raise UsageError(f"--hires-steps {args.hires_steps}: expected 0 (= --steps) to 1000")
    if args.cfg is not None and not 0 <= args.cfg <= 100:
        raise UsageError(f"--cfg {args.cfg}: expected 0 to 100")
    if not SCALE_RANGE[0] <= args.scale <= SCALE_RANGE[1]:
        raise UsageError(f"--scale {args.scale:g}: expected {SCALE_RANGE[0]:g} to {SCALE_RANGE[1]:g}")
    if not 0 < args.denoising_strength <= 1:
        raise UsageError(f"--denoising-strength {args.denoising_strength:g}: expected more than 0, at most 1")
    if not -1 <= args.seed < 2**63:
        raise UsageError(f"--seed {args.seed}: expected -1 (random) or 0 to 2^63 - 1")
    if not 1 <= args.batch <= 64:
        raise UsageError(f"--batch {args.batch}: expected 1 to 64")
    for name in ("width", "height"):
        v = getattr(args, name)
        if v is not None and (v < 8 or v % 8):
            raise UsageError(f"--{name} {v}: expected a positive multiple of 8")
    if not args.out.lower().endswith(".png"):
        raise UsageError(f"--out {args.out}: expected a .png file name")


def _device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: expected auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available (torch {torch.__version__})")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: expected auto, cpu, cuda, cuda:N or mps")
    return dev


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    return getattr(torch, name)


@contextlib.contextmanager
def _library_noise_off(quiet: bool):
    """Loading without diffusers' deprecation and set-up notices (they are about diffusers'
    own API, not the user's input); its progress bar stays unless --quiet."""
    import diffusers
    diffusers.utils.logging.set_verbosity_error()
    if quiet:
        diffusers.utils.logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")
        warnings.filterwarnings("ignore", category=UserWarning, module="huggingface_hub")
        yield


def _needs_standalone_extra() -> None:
    missing = [m for m in ("diffusers", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"the standalone runner needs {' and '.join(missing)}: "
                         "pip install 'sd-webui-fam[standalone]' (or pip install diffusers transformers)")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")   # import-time notices, not ours


# ---- measuring ----------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of one variant: allocated CUDA memory, or the process's peak RSS on Linux
    (reset before each variant, freed memory handed back to the OS first)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.label = "peak CUDA memory" if device.type == "cuda" else "peak RSS"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")            # peak RSS (VmHWM) := current RSS
        except OSError:
            pass

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        if self.device.type != "cpu":
            return None
        try:
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- running ------------------------------------------------------------------------------
@dataclasses.dataclass
class Plan:
    """What both variants share: the same sampler settings, sizes, seeds and conditioning."""
    model_name: str
    sampler: Any                  # a fresh diffusers scheduler of the chosen sampler
    sampler_name: str
    native_px: tuple[int, int]    # (height, width)
    hires_px: tuple[int, int]
    factor: int                   # pixels per latent cell
    steps: int
    hires_steps: int              # 0: the same as steps
    cfg: float
    scale: float
    seeds: list[int]
    tiling: str
    cond: Any                     # CfgCond at the native size
    hires_cond: Any = None        # SDXL: the same prompts conditioned on the high-res size

    @property
    def native_hw(self) -> tuple[int, int]:
        return (self.native_px[0] // self.factor, self.native_px[1] // self.factor)

    @property
    def hires_hw(self) -> tuple[int, int]:
        return (self.hires_px[0] // self.factor, self.hires_px[1] // self.factor)


@dataclasses.dataclass
class Variant:
    label: str                   # "FAM" or "Hires fix"
    params: FamParams
    strength: float
    images: list = dataclasses.field(default_factory=list)
    sampling_s: float = 0.0
    decode_s: float = 0.0
    peak: int | None = None
    info: dict = dataclasses.field(default_factory=dict)
    paths: list = dataclasses.field(default_factory=list)
    native: Any = None            # the native latents (the same for both variants)

    @property
    def total_s(self) -> float:
        return self.sampling_s + self.decode_s


def _bar(quiet: bool):
    from tqdm.auto import tqdm

    def wrap(desc: str, iterable=None, total=None):
        return tqdm(iterable, desc=desc, total=total, disable=quiet, leave=False,
                    dynamic_ncols=True, file=sys.stderr)
    return wrap


def _render(model, variant: Variant, plan: Plan, bar) -> None:
    from ..hosts.diffusers import generate
    pass_name = {"native": "native pass", "hires": f"{variant.label} pass"}
    meter = PeakMemory(model.device)
    meter.reset()
    t0 = time.perf_counter()
    result = generate(
        model.unet, plan.sampler, plan.cond, native_hw=plan.native_hw, hires_hw=plan.hires_hw,
        steps=plan.steps, params=variant.params, guidance_scale=plan.cfg, seed=plan.seeds,
        hires_cond=plan.hires_cond, hires_steps=plan.hires_steps or None,
        denoising_strength=variant.strength,
        progress=lambda name, ts: bar(f"{variant.label}: {pass_name[name]}", ts))
    _sync(model.device)
    t1 = time.perf_counter()
    note = model.set_tiling(plan.hires_hw, plan.tiling)
    if note:
        print(note)
    variant.images = [model.decode(z) for z in bar(f"{variant.label}: decode", result.hires.split(1))]
    _sync(model.device)
    variant.decode_s = time.perf_counter() - t1
    variant.sampling_s = t1 - t0
    variant.peak = meter.peak()
    variant.info = dict(result.info)
    variant.native = result.native


def _fields(plan: Plan, variant: Variant, seed: int) -> dict:
    """The infotext entries of one image, in A1111's order and words."""
    karras = plan.sampler_name.endswith(" Karras")
    h, w = plan.native_px
    fields = {
        "Steps": plan.steps,
        "Sampler": plan.sampler_name[: -len(" Karras")] if karras else plan.sampler_name,
        "Schedule type": "Karras" if karras else None,
        "CFG scale": plan.cfg, "Seed": seed, "Size": f"{w}x{h}", "Model": plan.model_name,
        "Denoising strength": variant.strength, "Hires upscale": plan.scale,
        "Hires steps": plan.hires_steps or None, "Hires upscaler": HIRES_UPSCALER,
    }
    fields.update(variant.params.to_infotext())
    fields.update(variant.info)
    return fields


def _paths(out: str, batch: int, suffix: str) -> list[str]:
    p = Path(out)
    stems = [p.stem] if batch == 1 else [f"{p.stem}-{i}" for i in range(batch)]
    return [str(p.with_name(f"{s}{suffix}.png")) for s in stems]


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def run(args: argparse.Namespace) -> int:
    params = fam_params(args)
    _check(args)
    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    _needs_standalone_extra()
    from .models import load_model, make_sampler
    from PIL import Image
    from .pngs import infotext, save_png, side_by_side

    with _library_noise_off(args.quiet):
        model = load_model(args.model, device=device, dtype=dtype, config=args.config)
    discover(model.unet).am_layers(params.am_block_indices, model.name)   # AM blocks it has?
    prompt, negative = args.prompt, args.negative
    if not model.reads_prompts and (prompt or negative):
        print(f"note: {model.name} has no text encoder (one fixed conditioning): --prompt and "
              "--negative are ignored")
        prompt = negative = ""
    for what, text in (("prompt", prompt), ("negative prompt", negative)):
        if model.prompt_overflow(text):
            print(f"note: the {what} is longer than the text encoder's window; its last "
                  f"{model.prompt_overflow(text)} tokens are cut off")
    d = model.defaults
    native_px = (args.height or model.native_px[0], args.width or model.native_px[1])
    hires_px = tuple(int(s * args.scale) // model.factor * model.factor for s in native_px)
    sampler_name = args.sampler or d["sampler"]
    seed = random.randrange(2**32) if args.seed == -1 else args.seed
    plan = Plan(
        model_name=model.name, sampler=make_sampler(model, sampler_name, args.prediction_type),
        sampler_name=sampler_name, native_px=native_px, hires_px=hires_px, factor=model.factor,
        steps=args.steps or d["steps"], hires_steps=args.hires_steps,
        cfg=d["cfg"] if args.cfg is None else args.cfg, scale=args.scale,
        seeds=[seed + i for i in range(args.batch)], tiling=args.vae_tiling,
        cond=model.conditioning(prompt, negative, args.batch, native_px),
        hires_cond=model.conditioning(prompt, negative, args.batch, hires_px)
        if model.size_conditioned else None)
    print(f"{model.name} ({model.kind}) on {device} in {str(dtype).replace('torch.', '')}: "
          f"{native_px[1]}x{native_px[0]} -> {hires_px[1]}x{hires_px[0]}, {sampler_name}, "
          f"{plan.steps}+{plan.hires_steps or plan.steps} steps, CFG {plan.cfg:g}, seed {seed}"
          + (f" (+0..{args.batch - 1})" if args.batch > 1 else ""))

    variants = [Variant("FAM", params, 1.0 if params.full_renoise else args.denoising_strength)]
    if args.compare:
        variants.append(Variant("Hires fix", FamParams(), args.denoising_strength))
    bar = _bar(args.quiet)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for v, suffix in zip(variants, ("", "_hiresfix")):
        _render(model, v, plan, bar)
        v.paths = _paths(args.out, args.batch, suffix)
        for image, path, image_seed in zip(v.images, v.paths, plan.seeds):
            save_png(image, path, infotext(prompt, negative, _fields(plan, v, image_seed)))
    for note in variants[0].info.items():
        print("%s: %s" % note)
    _report(variants, PeakMemory(device).label)
    if args.compare:
        fam, plain = variants
        path = _paths(args.out, 1, "_compare")[0]
        seeds = "same seed" if args.batch == 1 else "same seeds"
        h, w = plan.native_px
        native = [model.decode(z).resize(fam.images[0].size, Image.NEAREST)
                  for z in fam.native.split(1)]
        side_by_side([(native, "native pass", f"{w}x{h}, shown enlarged"),
                      (plain.images, "Hires fix", f"denoise {plain.strength:g}, {seeds}"),
                      (fam.images, "FAM", f"denoise {fam.strength:g}, {_modulations(params)}")]
                     ).save(path)
        print(f"comparison: {path}")
    return 0


def _modulations(params: FamParams) -> str:
    on = [name for name, enabled in (("FM", params.fm_enabled),
                                     ("AM", params.am_enabled and params.am_lambda > 0)) if enabled]
    return " + ".join(on) if on else "FM and AM off"


def _report(variants: list[Variant], memory_label: str) -> None:
    width = max(len(v.label) for v in variants)
    for v in variants:
        print(f"{v.label:<{width}}  {v.total_s:7.2f} s (sampling {v.sampling_s:.2f} s, decode "
              f"{v.decode_s:.2f} s), {memory_label} {_gib(v.peak)}: {', '.join(v.paths)}")
    if len(variants) == 2:
        fam, plain = variants
        ratio = (f", {memory_label} {fam.peak / plain.peak:.2f}x"
                 if fam.peak and plain.peak else "")
        print(f"FAM / Hires fix: time {fam.total_s / plain.total_s:.2f}x{ratio} "
              "(FAM ran first: one-time warm-up costs count against it)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)      # bad option syntax: argparse prints usage, exits 2
    from .models import ModelError
    threads = torch.get_num_threads()   # a model may lower it for its run (the toy models)
    try:
        return run(args)
    except (FamParamError, UsageError, LayerSelectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError) as e:
        first = str(e).splitlines()[0] if str(e) else "out of memory"
        print(f"error: out of memory ({first}); try --batch 1, a smaller --scale, --dtype "
              "float16, --record-budget-mb 0 or --vae-tiling on", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)
