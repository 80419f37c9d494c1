"""Train a toy world's model on this CPU, deterministically, and write its checkpoint.

    python -m fam.toy.train --world disc        # world 1
    python -m fam.toy.train --world stripes     # world 2
    python -m fam.toy.train --world copies      # world 3

ε-prediction on the scaled-linear schedule (the SD1.5 one), fresh synthetic images every
step (batch 32), AdamW with linear warm-up and cosine decay, gradient clipping, an EMA of
the weights (the EMA is what is saved, in fp16). Seeded data, noise and initialisation and a
fixed thread count: the same command gives the same weights. `--init` continues from an
earlier checkpoint's weights (fresh optimiser and schedule): a model trained in two stages
is rebuilt by its two commands, both recorded in its JSON."""

from __future__ import annotations

import argparse
import copy
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .model import (CHECKPOINTS, NATIVE, SCHEDULER_CONFIG, UNET_CONFIG, build_unet,
                    load_checkpoint, save_checkpoint, to_model, unet_config)
from .worlds import WORLDS

DEFAULTS = dict(steps=2000, batch=32, lr=1e-3, warmup=100, ema=0.999, seed=0, threads=2)


def alphas_cumprod(cfg: dict = SCHEDULER_CONFIG) -> torch.Tensor:
    betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5,
                           cfg["num_train_timesteps"], dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def train(world: str, steps: int, batch: int, lr: float, warmup: int, ema: float, seed: int,
          threads: int, progress: bool = True, snapshot=None, init: Path | None = None):
    """Returns (EMA UNet, prompt, record). Everything random comes from `seed`.
    `snapshot(step, ema_unet, prompt)`, if given, is called every 500 steps. `init`: a
    checkpoint of the same world whose weights and prompt the run starts from."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    unet = build_unet(unet_config(world)).train()
    prompt = torch.randn(1, 2, UNET_CONFIG["cross_attention_dim"],
                         generator=torch.Generator().manual_seed(seed + 3))
    if init is not None:
        start = load_checkpoint(init)
        if start.meta.get("world") != world:
            raise ValueError(f"--init {init} is a checkpoint of world {start.meta.get('world')!r}, "
                             f"not {world!r}")
        unet.load_state_dict({k: v.float() for k, v in start.unet.state_dict().items()})
        prompt = start.prompt
    ema_unet = copy.deepcopy(unet).eval().requires_grad_(False)
    g_data = torch.Generator().manual_seed(seed + 1)
    g_noise = torch.Generator().manual_seed(seed + 2)
    ctx = prompt.expand(batch, -1, -1)
    ac = alphas_cumprod()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    images = WORLDS[world].images
    bar = _bar(steps, progress, world)
    t0, losses = time.perf_counter(), []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        x0 = to_model(images(batch, g_data))
        t = torch.randint(0, len(ac), (batch,), generator=g_noise)
        eps = torch.randn(x0.shape, generator=g_noise)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        loss = F.mse_loss(unet(xt, t, encoder_hidden_states=ctx).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema_unet.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if snapshot is not None and (step + 1) % 500 == 0 and step + 1 < steps:
            snapshot(step + 1, ema_unet, prompt)
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    record = dict(steps=steps, batch=batch, lr=lr, warmup=warmup, ema=ema, seed=seed,
                  threads=threads, seconds=round(seconds, 1),
                  final_loss=round(sum(losses[-200:]) / len(losses[-200:]), 5),
                  machine=f"{platform.machine()}, {torch.__version__}")
    return ema_unet, prompt, record


def _bar(total, enabled, desc):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=f"train {desc}", unit="step", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fam.toy.train", description=__doc__.split("\n")[0])
    ap.add_argument("--world", required=True, choices=sorted(WORLDS))
    for k, v in DEFAULTS.items():
        ap.add_argument(f"--{k}", type=type(v), default=v)
    ap.add_argument("--out", type=Path, default=None,
                    help="checkpoint path without suffix (default: the shipped one, "
                         "fam/toy/checkpoints/<world>)")
    ap.add_argument("--init", type=Path, default=None,
                    help="start from this checkpoint's weights (path without suffix)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--snapshots", action="store_true",
                    help="also save the EMA weights every 500 steps as <out>-step<N>")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.batch < 1 or a.threads < 1:
        ap.error("--steps, --batch and --threads must be at least 1")
    out = a.out or CHECKPOINTS / a.world
    w = WORLDS[a.world]
    meta = dict(world=w.name, number=w.number, summary=w.summary, native=NATIVE,
                unet=unet_config(a.world), scheduler=SCHEDULER_CONFIG,
                sampling=dict(sampler="euler", steps=20, guidance_scale=1.0),
                command=" ".join(["python -m fam.toy.train --world", a.world] + [
                    f"--{k} {getattr(a, k)}" for k, v in DEFAULTS.items() if getattr(a, k) != v]))
    if a.init is not None:
        start = load_checkpoint(a.init).meta
        meta["command"] += f" --init {a.init}"
        meta["init"] = dict(command=start.get("command"), training=start.get("training"))

    def snapshot(step, unet, prompt):
        save_checkpoint(out.with_name(f"{out.name}-step{step}"), unet, prompt,
                        dict(meta, training=dict(steps=step, of=a.steps)))

    unet, prompt, record = train(a.world, a.steps, a.batch, a.lr, a.warmup, a.ema, a.seed,
                                 a.threads, progress=not a.no_progress,
                                 snapshot=snapshot if a.snapshots else None, init=a.init)
    save_checkpoint(out, unet, prompt, dict(meta, training=record))
    print(f"{out}.safetensors: {record['steps']} steps in {record['seconds']:.0f} s, "
          f"final loss {record['final_loss']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
