"""Benchmark: native pass + plain Hires fix vs native pass + FAM hires pass.

Same UNet, scheduler (Euler), steps, sizes, seed and noise; the runs alternate and the table
gives FAM/plain ratios of time and peak memory. Random weights: the real SD1.5 / SDXL UNet
sizes on CUDA (fp16), a small preset with the same block layouts on CPU.

    python -m fam.bench --arch sd15 sdxl --scale 2 3 4 --device cuda --steps 10 [--json]

Peak memory (median over the timed runs): CUDA — torch.cuda.max_memory_allocated per run;
CPU — peak RSS (VmHWM) of one run over the RSS before the model was built (weights
included, as on CUDA), each variant in a fresh subprocess, warmed up, with glibc tuned to
return freed memory at once (Linux)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from .params import FamParams

# Real architecture configs (diffusers names); native latent size in the last element.
ARCHS = {
    "sd15": (dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  cross_attention_dim=768, attention_head_dim=8), 64),
    "sdxl": (dict(block_out_channels=(320, 640, 1280), layers_per_block=2,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                  cross_attention_dim=2048, use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816), 128),
}
# CPU preset: same layouts, narrow channels, shallow SDXL transformers, small latents.
CPU_PRESET = {
    "sd15": (dict(block_out_channels=(32, 64, 128, 128), cross_attention_dim=64,
                  attention_head_dim=4, norm_num_groups=16), 32),
    "sdxl": (dict(block_out_channels=(32, 64, 128), transformer_layers_per_block=(1, 2, 3),
                  attention_head_dim=(2, 4, 4), cross_attention_dim=64,
                  addition_time_embed_dim=8, projection_class_embeddings_input_dim=64 + 6 * 8,
                  norm_num_groups=16), 32),
}
SCHED = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def build(arch: str, device: str):
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from .hosts.diffusers import CfgCond
    config, native = ARCHS[arch]
    config = dict(config)
    if device == "cpu":
        small, native = CPU_PRESET[arch]
        config.update(small)
    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=native, **config).eval()
    if dtype != torch.float32:
        unet.to(dtype)
    g = torch.Generator().manual_seed(0)
    ctx = config["cross_attention_dim"]
    cond = CfgCond(torch.randn(2, 77, ctx, generator=g).to(device, dtype))
    if "addition_embed_type" in config:
        text = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        size = float(native * 8)
        cond.added = {"text_embeds": torch.randn(2, text, generator=g).to(device, dtype),
                      "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2,
                                               device=device, dtype=dtype)}
    return unet, EulerDiscreteScheduler(**SCHED), cond, native


def one_run(unet, sched, cond, native, scale, steps, fam: bool):
    from .hosts.diffusers import generate
    params = FamParams(enabled=fam)
    result = generate(unet, sched, cond, native_hw=(native, native),
                      hires_hw=(native * scale, native * scale), steps=steps, params=params)
    return result


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(arch, scale, steps, device, repeats):
    unet, sched, cond, native = build(arch, device)
    times = {False: [], True: []}
    peaks = {False: [], True: []}
    for fam in (False, True):                       # warm-up, not counted
        one_run(unet, sched, cond, native, scale, steps, fam)
    for _ in range(repeats):
        for fam in (False, True):                   # alternate plain / FAM
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            t0 = time.perf_counter()
            one_run(unet, sched, cond, native, scale, steps, fam)
            _sync(device)
            times[fam].append(time.perf_counter() - t0)
            if device == "cuda":
                peaks[fam].append(torch.cuda.max_memory_allocated())
    if device == "cpu":
        for _ in range(repeats):
            for fam in (False, True):
                peaks[fam].append(_cpu_peak(arch, scale, steps, fam))
    del unet
    plain_s, fam_s = statistics.median(times[False]), statistics.median(times[True])
    plain_b, fam_b = (int(statistics.median(peaks[f])) for f in (False, True))
    return dict(arch=arch, scale=scale, steps=steps, plain_s=round(plain_s, 4),
                fam_s=round(fam_s, 4), time_ratio=round(fam_s / plain_s, 4),
                plain_peak_bytes=plain_b, fam_peak_bytes=fam_b,
                memory_ratio=round(fam_b / plain_b, 4))


# glibc: large blocks mmapped and freed blocks returned at once, so RSS follows live memory
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
               "MALLOC_ARENA_MAX": "1"}


def _cpu_peak(arch, scale, steps, fam) -> int:
    """Peak-RSS growth of one run in a fresh process."""
    cmd = [sys.executable, "-m", "fam.bench", "--_peak", arch, str(scale), str(steps), str(int(fam))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **_MALLOC_ENV)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _peak_child(arch, scale, steps, fam) -> None:
    """Peak RSS of one run over the RSS before the model existed: weights included, as
    CUDA's max_memory_allocated. Both variants first run one step, so code pages, FFT plans
    and thread pools are resident in either case."""
    import diffusers  # noqa: F401  (library pages are not the model's memory)
    from .hosts import diffusers as _host  # noqa: F401
    before = _status_kib("VmRSS")
    unet, sched, cond, native = build(arch, "cpu")
    for warm in (False, True):
        one_run(unet, sched, cond, native, int(scale), 1, warm)
    with open("/proc/self/clear_refs", "w") as f:     # reset VmHWM (peak RSS) to VmRSS
        f.write("5")
    one_run(unet, sched, cond, native, int(scale), int(steps), bool(int(fam)))
    print((_status_kib("VmHWM") - before) * 1024)


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads)"


def table(rows) -> str:
    head = "| arch | scale | steps | plain s | FAM s | time FAM/plain | plain peak MiB | FAM peak MiB | memory FAM/plain |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['scale']}× | {r['steps']} | {r['plain_s']:.3f} | "
                     f"{r['fam_s']:.3f} | {r['time_ratio']:.3f} | {r['plain_peak_bytes'] / 2**20:.0f} | "
                     f"{r['fam_peak_bytes'] / 2**20:.0f} | {r['memory_ratio']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_peak":
        _peak_child(*argv[1:5])
        return 0
    ap = argparse.ArgumentParser(prog="python -m fam.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=["sd15"])
    ap.add_argument("--scale", nargs="+", type=int, choices=(2, 3, 4), default=[2])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if args.steps < 1 or args.repeats < 1:
        ap.error("--steps and --repeats must be at least 1")
    rows = []
    for arch in args.arch:
        for scale in args.scale:
            rows.append(measure(arch, scale, args.steps, args.device, args.repeats))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)   # progress
    report = {"device": device_name(args.device), "rows": rows}
    if args.device == "cpu":
        report["peak_memory"] = "peak RSS (VmHWM) of one run over the RSS before the model was built (weights included), fresh warmed-up process per variant, glibc returning freed memory at once"
    print(json.dumps(report) if args.json else f"device: {report['device']}\n{table(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
