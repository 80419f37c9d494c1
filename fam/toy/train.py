"""Train a toy world's model on this CPU, deterministically, and write its checkpoint.

    python -m fam.toy.train --world disc        # world 1
    python -m fam.toy.train --world stripes     # world 2
    python -m fam.toy.train --world copies      # world 3

ε-prediction on the scaled-linear schedule (the SD1.5 one), fresh synthetic images every
step (batch 32), AdamW with linear warm-up and cosine decay, gradient clipping, an EMA of
the weights (the EMA is what is saved, in fp16). Seeded data, noise and initialisation and a
fixed thread count: the same command gives the same weights. `--init` continues from an
earlier checkpoint's weights (fresh optimiser and schedule): a model trained in two stages
is rebuilt by its two commands, both recorded in its JSON.

`--attention-loss W` (world 3 only) adds W × a cross-entropy that pulls the self-attention
maps of `up_blocks.1` (16×16 tokens, one per 2×2 texture cell) of every patch token onto its
own position and its twin's in the other copy, half each: the generator knows where the twin
is, so the optimiser need not discover copying by attention on its own (left to the
denoising loss alone, it had not begun after 2350 steps, docs/quality.md). The sampled
model still has to draw both copies itself, and without its attention it cannot.

`--carry-loss W` (world 3 only) adds W × the error of a linear read-out (trained with the
model, not saved) of the leader's clean 2×2 cell from what the supervised attention layers
output at each token of either copy: the maps already look at the twin, and this teaches the
values to bring the twin's texture along (without it they carried none, docs/quality.md).

`--follower-weight W` (world 3 only) counts the error on the follower copy's pixels W times:
its texture has 0.3 of the leader's contrast, so at W = 1 / 0.3² ≈ 11 a wrong follower costs
as much as a wrong leader (at W = 1 the copying it asks for is worth 9 % of that)."""

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
from .worlds import WORLDS, PATCH, copies_scenes

DEFAULTS = dict(steps=2000, batch=32, lr=1e-3, warmup=100, ema=0.999, seed=0, threads=2,
                attention_loss=0.0, t_min=0, t_max=1000, weighting="eps", follower_weight=1.0,
                carry_loss=0.0)
SUPERVISED = "up_blocks.1"        # world 3: the token grid on which the copies' cells lie:
SIDE = NATIVE // 2                # SIDE × SIDE tokens, one per 2×2 cell


def alphas_cumprod(cfg: dict = SCHEDULER_CONFIG) -> torch.Tensor:
    betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5,
                           cfg["num_train_timesteps"], dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


class KeepMap:
    """attn1 processor for training: plain self-attention with its map computed explicitly
    and kept (`probs`, (batch·heads, tokens, tokens)) for the supervision loss, and its
    output before `to_out` (`mixed`, (batch, tokens, channels)) for the carry loss."""

    def __init__(self):
        self.probs = self.mixed = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        q, k, v = (attn.head_to_batch_dim(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        self.probs = attn.get_attention_scores(q, k)
        self.mixed = attn.batch_to_head_dim(torch.bmm(self.probs, v))
        return attn.to_out[1](attn.to_out[0](self.mixed))


def twin_tokens(places, side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image, token, twin token) for every token of both copies on a side × side token grid
    of the 32 px image (the copies' corners lie on the grid: even pixels for 16 × 16)."""
    cell = NATIVE // side
    n = PATCH // cell
    rows = []
    for i, ((y1, x1), (y2, x2)) in enumerate(places):
        for r in range(n):
            for c in range(n):
                a = (y1 // cell + r) * side + x1 // cell + c
                b = (y2 // cell + r) * side + x2 // cell + c
                rows += [(i, a, b), (i, b, a)]
    return torch.tensor(rows).unbind(1)


def follower_weights(places, weight: float) -> torch.Tensor:
    """(n, 1, 32, 32): `weight` on each image's follower copy (its second place), 1 elsewhere."""
    w = torch.ones(len(places), 1, NATIVE, NATIVE)
    for i, (_, (y, x)) in enumerate(places):
        w[i, :, y:y + PATCH, x:x + PATCH] = weight
    return w


def leader_cells(x0: torch.Tensor, places, side: int = SIDE):
    """(image, token, target) for every token of both copies on the side × side grid: the
    target is the leader's (first place's) clean cell at the same place in the patch, each
    channel minus its cell mean (the texture alone), flattened to 3 · cell² values."""
    cell = NATIVE // side
    n = PATCH // cell
    cells = F.unfold(x0, cell, stride=cell)                       # (B, 3·cell², side²)
    cells = cells.view(x0.shape[0], 3, cell * cell, side * side)
    cells = (cells - cells.mean(2, keepdim=True)).flatten(1, 2).transpose(1, 2)   # (B, side², 3·cell²)
    img, tok, lead = [], [], []
    for i, ((y1, x1), (y2, x2)) in enumerate(places):
        for r in range(n):
            for c in range(n):
                src = (y1 // cell + r) * side + x1 // cell + c
                for y, x in ((y1, x1), (y2, x2)):
                    img.append(i)
                    tok.append((y // cell + r) * side + x // cell + c)
                    lead.append(src)
    img, tok, lead = (torch.tensor(v) for v in (img, tok, lead))
    return img, tok, cells[img, lead]


def carry_loss(mixed, heads_out, x0: torch.Tensor, places) -> torch.Tensor:
    """Mean squared error of each read-out head (one per supervised layer) on the tokens of
    both copies against the leader's clean cell (`leader_cells`)."""
    total = 0.0
    for m, head in zip(mixed, heads_out):
        img, tok, target = leader_cells(x0, places, math.isqrt(m.shape[1]))
        total = total + F.mse_loss(head(m[img, tok]), target)
    return total / len(mixed)


def attention_loss(maps, heads: int, places) -> torch.Tensor:
    """Cross-entropy of each patch token's head-averaged attention against ½ on itself and ½
    on its twin (a token cannot tell its own copy from the other: both are the same place in
    the same texture), averaged over the tokens of both copies and the layers in `maps`."""
    total = 0.0
    for probs in maps:
        bh, t, _ = probs.shape
        p = probs.view(bh // heads, heads, t, t).mean(1).clamp_min(1e-8).log()
        img, tok, twin = twin_tokens(places, math.isqrt(t))
        total = total - 0.5 * (p[img, tok, tok] + p[img, tok, twin]).mean()
    return total / len(maps)


def train(world: str, steps: int, batch: int, lr: float, warmup: int, ema: float, seed: int,
          threads: int, progress: bool = True, snapshot=None, init: Path | None = None,
          attention_loss_weight: float = 0.0, t_range: tuple[int, int] = (0, 1000),
          weighting: str = "eps", follower_weight: float = 1.0, carry_loss_weight: float = 0.0):
    """Returns (EMA UNet, prompt, record). Everything random comes from `seed`.
    `snapshot(step, ema_unet, prompt)`, if given, is called every 500 steps. `init`: a
    checkpoint of the same world whose weights and prompt the run starts from.
    `attention_loss_weight` > 0 (world 3): the attention supervision of the module doc.
    `t_range`: the training timesteps drawn (uniformly), [lo, hi); a stage can dwell on the
    noise levels where a world's structure is decided (world 3: where the texture is
    half-visible, so that the other copy pays). `weighting` "x0": the ε error of each image
    weighted by (1 − ᾱ)/ᾱ, i.e. the error of the x₀ it implies — the plain ε-loss counts a
    wrong x₀ at t ≈ 200 eight times more than at t ≈ 500, where the other copy pays most.
    `follower_weight` ≠ 1 (world 3): the error on the follower's pixels counts that many times.
    `carry_loss_weight` > 0 (world 3): the carry loss of the module doc."""
    if (attention_loss_weight or follower_weight != 1 or carry_loss_weight) and world != "copies":
        raise ValueError(f"the attention and carry losses and the follower weight need the "
                         f"copies' places: world 'copies', not {world!r}")
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
    kept = {}
    if attention_loss_weight or carry_loss_weight:
        kept = {name: KeepMap() for name, _ in unet.named_modules()
                if name.startswith(SUPERVISED) and name.endswith("attn1")}
        for name, m in unet.named_modules():
            if name in kept:
                m.set_processor(kept[name])
        layer = next(m for n, m in unet.named_modules() if n in kept)
        heads = layer.heads
    readouts = torch.nn.ModuleList(
        torch.nn.Linear(layer.to_out[0].in_features, 3 * (NATIVE // SIDE) ** 2) for _ in kept
    ) if carry_loss_weight else torch.nn.ModuleList()
    g_data = torch.Generator().manual_seed(seed + 1)
    g_noise = torch.Generator().manual_seed(seed + 2)
    ctx = prompt.expand(batch, -1, -1)
    ac = alphas_cumprod()
    opt = torch.optim.AdamW([*unet.parameters(), *readouts.parameters()], lr=lr, weight_decay=0.0)
    images = WORLDS[world].images
    bar = _bar(steps, progress, world)
    t0, c0, losses, att_losses, carry_losses = time.perf_counter(), time.process_time(), [], [], []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        wmap = None
        if kept or follower_weight != 1:
            x0, places = copies_scenes(batch, g_data)
            x0 = to_model(x0)
            if follower_weight != 1:
                wmap = follower_weights(places, follower_weight)
        else:
            x0 = to_model(images(batch, g_data))
        t = torch.randint(*t_range, (batch,), generator=g_noise)
        eps = torch.randn(x0.shape, generator=g_noise)
        a = ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = unet(xt, t, encoder_hidden_states=ctx).sample
        if weighting == "eps" and wmap is None:
            loss = F.mse_loss(pred, eps)
        else:
            err = (pred - eps).pow(2)
            err = (err if wmap is None else err * wmap).mean((1, 2, 3))
            loss = (err * (1 - ac[t]) / ac[t]).mean() if weighting == "x0" else err.mean()
        total = loss
        if attention_loss_weight:
            att = attention_loss([k.probs for k in kept.values()], heads, places)
            att_losses.append(att.item())
            total = total + attention_loss_weight * att
        if carry_loss_weight:
            carry = carry_loss([k.mixed for k in kept.values()], readouts, x0, places)
            carry_losses.append(carry.item())
            total = total + carry_loss_weight * carry
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_([*unet.parameters(), *readouts.parameters()], 1.0)
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
                bar.set_postfix(loss=f"{_mean(losses, 50):.4f}",
                                **({"att": f"{_mean(att_losses, 50):.3f}"} if att_losses else {}),
                                **({"carry": f"{_mean(carry_losses, 50):.4f}"} if carry_losses else {}))
    if bar is not None:
        bar.close()
    record = dict(steps=steps, batch=batch, lr=lr, warmup=warmup, ema=ema, seed=seed,
                  threads=threads, t_range=list(t_range), weighting=weighting,
                  **({"follower_weight": follower_weight} if follower_weight != 1 else {}),
                  seconds=round(time.perf_counter() - t0, 1),
                  cpu_seconds=round(time.process_time() - c0, 1),
                  final_loss=round(_mean(losses, 200), 5),
                  machine=f"{platform.machine()}, {torch.__version__}")
    if att_losses:
        record.update(attention_loss=attention_loss_weight,
                      final_attention_loss=round(_mean(att_losses, 200), 4))
    if carry_losses:
        record.update(carry_loss=carry_loss_weight, final_carry_loss=round(_mean(carry_losses, 200), 5))
    return ema_unet, prompt, record


def _mean(values, last: int) -> float:
    return sum(values[-last:]) / len(values[-last:])


def _bar(total, enabled, desc):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=f"train {desc}", unit="step", file=sys.stderr)


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fam.toy.train", description=__doc__.split("\n")[0])
    ap.add_argument("--world", required=True, choices=sorted(WORLDS))
    for k, v in DEFAULTS.items():
        ap.add_argument(_flag(k), type=type(v), default=v, dest=k)
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
    if a.weighting not in ("eps", "x0"):
        ap.error("--weighting: eps (the plain ε-loss) or x0 (the error of the x₀ it implies)")
    if not 0 <= a.t_min < a.t_max <= 1000:
        ap.error("--t-min and --t-max: 0 ≤ t-min < t-max ≤ 1000 (training timesteps drawn)")
    if a.attention_loss < 0 or (a.attention_loss and a.world != "copies"):
        ap.error("--attention-loss must be ≥ 0, and above 0 only for --world copies (it needs "
                 "the copies' places)")
    if a.carry_loss < 0 or (a.carry_loss and a.world != "copies"):
        ap.error("--carry-loss must be ≥ 0, and above 0 only for --world copies (it needs the "
                 "copies' places)")
    if a.follower_weight <= 0 or (a.follower_weight != 1 and a.world != "copies"):
        ap.error("--follower-weight must be > 0, and other than 1 only for --world copies (it "
                 "needs the copies' places)")
    out = a.out or CHECKPOINTS / a.world
    w = WORLDS[a.world]
    meta = dict(world=w.name, number=w.number, summary=w.summary, native=NATIVE,
                unet=unet_config(a.world), scheduler=SCHEDULER_CONFIG,
                sampling=dict(sampler="euler", steps=20, guidance_scale=1.0),
                command=" ".join(["python -m fam.toy.train --world", a.world] + [
                    f"{_flag(k)} {getattr(a, k)}" for k, v in DEFAULTS.items() if getattr(a, k) != v]))
    if a.init is not None:
        start = load_checkpoint(a.init).meta
        meta["command"] += f" --init {a.init}"
        meta["init"] = {k: start[k] for k in ("command", "training", "init") if k in start}

    def snapshot(step, unet, prompt):
        save_checkpoint(out.with_name(f"{out.name}-step{step}"), unet, prompt,
                        dict(meta, training=dict(steps=step, of=a.steps)))

    unet, prompt, record = train(a.world, a.steps, a.batch, a.lr, a.warmup, a.ema, a.seed,
                                 a.threads, progress=not a.no_progress,
                                 snapshot=snapshot if a.snapshots else None, init=a.init,
                                 attention_loss_weight=a.attention_loss, t_range=(a.t_min, a.t_max),
                                 weighting=a.weighting, follower_weight=a.follower_weight,
                                 carry_loss_weight=a.carry_loss)
    save_checkpoint(out, unet, prompt, dict(meta, training=record))
    print(f"{out}.safetensors: {record['steps']} steps in {record['seconds']:.0f} s, "
          f"final loss {record['final_loss']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
