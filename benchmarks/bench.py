"""Benchmark: native pass + plain Hires fix vs native pass + FAM hires pass, per engine
(`benchmarks.engines`: the diffusers engine and the A1111 host on an ldm-named UNet). Same
UNet, sampler (Euler), steps, sizes, seed and noise for plain and FAM; runs alternate after
a one-step warm-up of each; medians. Run from the repository root:

    python -m benchmarks.bench --preset cpu            # what docs/benchmarks.md records for CPU
    python -m benchmarks.bench --preset gpu            # one H100, < 8 min, the table last
    python -m benchmarks.bench --engine a1111 --arch sdxl --scale 2 --device cuda --split --json

Columns: time FAM/plain; extra peak memory (CUDA: torch.cuda.max_memory_allocated; CPU: peak
RSS of a fresh, warmed-up process per variant); the record's size, the host memory FAM
allocated for it (peak, and what is left after the generation), and the growth of PyTorch's
caching pinned-host allocator during a FAM run (CUDA). `--split`: the per-step overhead of FM,
AM (record on the device) and the record's transfer (AM with the offloaded record minus AM
with the record on the device; CUDA only) as differences of whole runs over the steps.
`--am-layer`: one AM layer's extra time split into its parts."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from fam.params import FamParams

from .engines import ARCHS, ENGINES, make_engine

FAM = FamParams(enabled=True)
SPLIT = {"FM": FAM.replace(am_enabled=False),
         "AM": FAM.replace(fm_enabled=False, record_offload=False),
         "AM offloaded": FAM.replace(fm_enabled=False)}
# targets: time FAM/plain, extra device memory (GiB)
TARGETS = {("sd15", 2): 1.02, ("sd15", 3): 1.02, ("sd15", 4): 1.02,
           ("sdxl", 2): 1.03, ("sdxl", 3): 1.01, ("sdxl", 4): 1.01}
EXTRA_GIB = {"sd15": 0.25, "sdxl": 0.5}
PRESETS = {
    "cpu": dict(device="cpu", engine=list(ENGINES), arch=["sd15", "sdxl"], scale=[2], steps=10,
                repeats=3, split=True, am_layer=True),
    "gpu": dict(device="cuda", engine=list(ENGINES), arch=["sdxl", "sd15"], scale=[2, 3, 4],
                steps=10, repeats=2, split=True, split_steps=5, am_layer=True,
                split_engines=["a1111"], split_scales=[2], deadline_s=400),
}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _cached_pinned() -> int:
    """Bytes held by PyTorch's caching pinned-host allocator (CUDA), 0 where unknown."""
    stats = getattr(torch.cuda, "host_memory_stats", None)
    if not torch.cuda.is_available() or stats is None:
        return 0
    return int(stats().get("allocated_bytes.current", 0))


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _timed(engine, scale, steps, params, device, clock):
    """(seconds, CUDA peak bytes or None, FamRun or None) of one generation."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    t0 = clock()
    run = engine.run(scale, steps, params)
    _sync(device)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return clock() - t0, peak, run


def measure(engine, arch, scale, steps, device, repeats, clock=time.perf_counter):
    """FAM vs plain, alternating; time, extra peak memory and the record's host memory."""
    for params in (None, FAM):                      # warm-up, not counted
        engine.run(scale, 1, params)
    times, peaks = {False: [], True: []}, {False: [], True: []}
    pinned_before = _cached_pinned()
    run = None
    for _ in range(repeats):
        for fam in (False, True):
            t, peak, r = _timed(engine, scale, steps, FAM if fam else None, device, clock)
            times[fam].append(t)
            peaks[fam].append(peak)
            run = r or run
    if device == "cpu":
        peaks = {fam: [_cpu_peak(engine.name, arch, scale, steps, fam) for _ in range(repeats)]
                 for fam in (False, True)}
    plain_s, fam_s = statistics.median(times[False]), statistics.median(times[True])
    plain_b, fam_b = (int(statistics.median(peaks[f])) for f in (False, True))
    record = run.stats.get("record_bytes", 0)
    return dict(engine=engine.name, arch=arch, scale=scale, steps=steps,
                plain_s=round(plain_s, 4), fam_s=round(fam_s, 4),
                time_ratio=round(fam_s / plain_s, 4), time_target=TARGETS.get((arch, scale)),
                plain_peak_bytes=plain_b, fam_peak_bytes=fam_b, extra_peak_bytes=fam_b - plain_b,
                extra_target_bytes=int(EXTRA_GIB[arch] * 2**30),
                record_bytes=record, host_peak_bytes=run.memory.peak_bytes,
                host_left_bytes=run.memory.allocated_bytes, pinned=run.memory.pin,
                caching_pinned_growth_bytes=_cached_pinned() - pinned_before,
                prefetched=run.stats.get("prefetched", 0), loaded=run.stats.get("loaded", 0))


def measure_split(engine, arch, scale, steps, device, repeats, clock=time.perf_counter):
    """Per-step overhead of FM, AM and the record transfer: whole runs of each variant minus
    the plain run, over the steps (the native pass's recording included)."""
    variants = {"plain": None, **SPLIT}
    if device != "cuda":
        variants.pop("AM offloaded")        # no device: nothing is transferred
    for params in variants.values():
        engine.run(scale, 1, params)
    times = {k: [] for k in variants}
    for _ in range(repeats):
        for name, params in variants.items():
            times[name].append(_timed(engine, scale, steps, params, device, clock)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    step_ms = 1000 * med["plain"] / steps
    row = dict(engine=engine.name, arch=arch, scale=scale, steps=steps,
               plain_step_ms=round(step_ms, 3),
               fm_ms=round(1000 * (med["FM"] - med["plain"]) / steps, 3),
               am_ms=round(1000 * (med["AM"] - med["plain"]) / steps, 3))
    if "AM offloaded" in med:
        row["transfer_ms"] = round(1000 * (med["AM offloaded"] - med["AM"]) / steps, 3)
    return row


def am_layer(arch: str, scale: int, device: str, iters: int = 20, clock=time.perf_counter):
    """One AM layer of the default block (SDXL: output_blocks.0-2, SD1.5: output_blocks.3-5),
    CFG batch 2: the plain layer, the whole AM layer, and the AM parts on their own."""
    import torch.nn.functional as F
    from fam.attention import AmContext, am_self_attention, pool_keys, split_heads
    from .ldm import LDM_ARCHS, LDM_CPU, CrossAttention
    cfg = (LDM_CPU if device == "cpu" else LDM_ARCHS)[arch]
    level = len(cfg.mult) - 1 if arch == "sdxl" else 2
    C, heads = cfg.channels * cfg.mult[level], cfg.heads[level]
    h = w = cfg.native // 2 ** level
    H, W = h * scale, w * scale
    dtype = torch.float16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    attn = CrossAttention(C, heads).to(device, dtype).eval()
    hidden = torch.randn(2, H * W, C, device=device, dtype=dtype)
    native = torch.randn(2, h * w, C, device=device, dtype=dtype)
    ctx = AmContext(native, (H, W), (h, w), 0.7)
    v = split_heads(attn.to_v(hidden), heads)
    qn, kn = (split_heads(p(native), heads) for p in (attn.to_q, attn.to_k))
    pooled = pool_keys(v, (H, W), (h, w))
    hires = F.scaled_dot_product_attention(split_heads(attn.to_q(hidden), heads),
                                           split_heads(attn.to_k(hidden), heads), v)
    small = F.scaled_dot_product_attention(qn, kn, pooled)
    B, nh, _, d = hires.shape
    parts = {
        "plain layer": lambda: attn(hidden),
        "AM layer": lambda: am_self_attention(attn, hidden, ctx),
        "native q/k projections": lambda: (attn.to_q(native), attn.to_k(native)),
        "native-grid SDPA": lambda: F.scaled_dot_product_attention(qn, kn, pooled),
        "key pooling": lambda: pool_keys(v, (H, W), (h, w)),
        "blend": lambda: hires.view(B, nh, h, scale, w, scale, d).lerp_(
            small.view(B, nh, h, 1, w, 1, d), 0.7),
    }
    samples = {name: [] for name in parts}
    with torch.inference_mode():
        for i in range(iters + 3):                  # interleaved: drift hits every part alike
            for name, fn in parts.items():
                _sync(device)
                t0 = clock()
                fn()
                _sync(device)
                if i >= 3:
                    samples[name].append(clock() - t0)
    out = {name: 1000 * statistics.median(s) for name, s in samples.items()}
    row = dict(arch=arch, scale=scale, tokens=H * W, channels=C, heads=heads)
    row.update({k: round(v, 4) for k, v in out.items()})
    row["AM extra"] = round(out["AM layer"] - out["plain layer"], 4)
    return row


# glibc: large blocks mmapped and freed blocks returned at once, so RSS follows live memory
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
               "MALLOC_ARENA_MAX": "1"}


def _cpu_peak(engine, arch, scale, steps, fam) -> int:
    """Peak-RSS growth of one run in a fresh process."""
    cmd = [sys.executable, "-m", "benchmarks.bench", "--_peak", engine, arch, str(scale), str(steps),
           str(int(fam))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **_MALLOC_ENV)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _peak_child(engine, arch, scale, steps, fam) -> None:
    """Peak RSS of one run over the RSS before the model existed: weights included, as
    CUDA's max_memory_allocated. Both variants first run one step, so code pages, FFT plans
    and thread pools are resident in either case."""
    import diffusers  # noqa: F401  (library pages are not the model's memory)
    from fam.hosts import diffusers as _host, a1111 as _a1111  # noqa: F401
    before = _status_kib("VmRSS")
    eng = make_engine(engine, arch, "cpu")
    for warm in (None, FAM):
        eng.run(int(scale), 1, warm)
    with open("/proc/self/clear_refs", "w") as f:     # reset VmHWM (peak RSS) to VmRSS
        f.write("5")
    eng.run(int(scale), int(steps), FAM if int(fam) else None)
    print((_status_kib("VmHWM") - before) * 1024)


def device_name(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"cpu ({os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads)"


def _mib(b) -> str:
    return f"{b / 2**20:.1f}"


def table(rows) -> str:
    head = ("| engine | arch | scale | steps | plain s | FAM s | time FAM/plain (target) | extra peak MiB "
            "(target) | record MiB | FAM host MiB peak / after | caching pinned growth MiB |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        ok = "✓" if r["time_ratio"] <= r["time_target"] else "✗"
        mem_ok = "✓" if r["extra_peak_bytes"] <= r["extra_target_bytes"] else "✗"
        host = f"{_mib(r['host_peak_bytes'])} / {_mib(r['host_left_bytes'])}"
        if r["pinned"]:
            host += " pinned"
        lines.append(
            f"| {r['engine']} | {r['arch']} | {r['scale']}× | {r['steps']} | {r['plain_s']:.3f} | "
            f"{r['fam_s']:.3f} | {r['time_ratio']:.3f} (≤ {r['time_target']}) {ok} | "
            f"{_mib(r['extra_peak_bytes'])} (≤ {_mib(r['extra_target_bytes'])}) {mem_ok} | "
            f"{_mib(r['record_bytes'])} | {host} | {_mib(r['caching_pinned_growth_bytes'])} |")
    return "\n".join(lines)


def split_table(rows) -> str:
    lines = ["| engine | arch | scale | plain step ms | FM ms | AM ms | transfer ms | FAM total ms (% of step) |",
             "|" + "---|" * 8]
    for r in rows:
        tr = r.get("transfer_ms")
        total = r["fm_ms"] + r["am_ms"] + (tr or 0)
        lines.append(f"| {r['engine']} | {r['arch']} | {r['scale']}× | {r['plain_step_ms']:.2f} | "
                     f"{r['fm_ms']:.2f} | {r['am_ms']:.2f} | {'n/a' if tr is None else f'{tr:.2f}'} | "
                     f"{total:.2f} ({100 * total / r['plain_step_ms']:.1f} %) |")
    return "\n".join(lines)


def layer_table(rows) -> str:
    keys = ["plain layer", "AM layer", "AM extra", "native q/k projections", "native-grid SDPA",
            "key pooling", "blend"]
    lines = ["| arch | scale | tokens | " + " | ".join(f"{k} ms" for k in keys) + " |",
             "|" + "---|" * (3 + len(keys))]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['scale']}× | {r['tokens']} | "
                     + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--_peak":
        _peak_child(*argv[1:6])
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="a recorded configuration (PRESETS); options given explicitly win")
    ap.add_argument("--engine", nargs="+", choices=ENGINES, default=["diffusers"])
    ap.add_argument("--arch", nargs="+", choices=sorted(ARCHS), default=["sd15"])
    ap.add_argument("--scale", nargs="+", type=int, choices=(2, 3, 4), default=[2])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per variant")
    ap.add_argument("--split", action="store_true", help="per-step FM / AM / transfer overhead")
    ap.add_argument("--split-steps", type=int, default=None, help="steps of the split runs")
    ap.add_argument("--am-layer", action="store_true", help="one AM layer's parts")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="cpu: process CPU time, steadier than wall time on a busy CPU machine")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.preset:   # the preset's values, under any option given explicitly
        ap.set_defaults(**PRESETS[args.preset])
        args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if args.device == "cuda" and args.clock == "cpu":
        ap.error("--clock cpu measures CPU work only; on CUDA use the wall clock")
    clock = CLOCKS[args.clock]
    if args.steps < 1 or args.repeats < 1:
        ap.error("--steps and --repeats must be at least 1")
    split_steps = args.split_steps or args.steps
    split_engines = getattr(args, "split_engines", args.engine)
    split_scales = getattr(args, "split_scales", args.scale)
    deadline = time.monotonic() + getattr(args, "deadline_s", float("inf"))
    rows, splits, layers, skipped = [], [], [], []

    def progress(row):
        print(json.dumps(row), file=sys.stderr, flush=True)

    for arch in args.arch:
        for name in args.engine:
            engine = make_engine(name, arch, args.device)
            for scale in args.scale:
                if time.monotonic() > deadline:
                    skipped.append(f"{name} {arch} {scale}×")
                    continue
                rows.append(measure(engine, arch, scale, args.steps, args.device, args.repeats,
                                    clock))
                progress(rows[-1])
                if args.split and name in split_engines and scale in split_scales:
                    splits.append(measure_split(engine, arch, scale, split_steps, args.device,
                                                args.repeats, clock))
                    progress(splits[-1])
            del engine
            if args.device == "cuda":
                torch.cuda.empty_cache()
        if args.am_layer:
            for scale in args.scale:
                layers.append(am_layer(arch, scale, args.device, clock=clock))
                progress(layers[-1])
    report = {"device": device_name(args.device), "clock": args.clock, "rows": rows, "split": splits,
              "am_layer": layers, "skipped_for_time": skipped}
    if args.device == "cpu":
        report["peak_memory"] = ("peak RSS (VmHWM) of one run over the RSS before the model was "
                                 "built (weights included), fresh warmed-up process per variant, "
                                 "glibc returning freed memory at once")
    if args.json:
        print(json.dumps(report))
        return 0
    out = [f"device: {report['device']}, {args.clock} clock"]
    if layers:
        out += ["", "AM layer, ms (median):", layer_table(layers)]
    if splits:
        out += ["", f"Per-step overhead ({split_steps} steps, ms):", split_table(splits)]
    if skipped:
        out += ["", "not measured (time limit): " + ", ".join(skipped)]
    out += ["", "FAM / plain Hires fix:", table(rows)]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
