"""Load a shipped toy model and render the methods the quality benchmark compares, for
given seeds: one call gives the native images and any of plain sampling at the target size,
plain Hires fix and FAM (full or ablated), all from the same native pass and noise."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable

import torch

from ..params import FamParams
from .model import CHECKPOINTS, load_checkpoint, make_scheduler, to_image
from .worlds import WORLDS, World

__all__ = ["Method", "METHODS", "method", "NO_ATTENTION", "self_attention_off", "ToyModel", "load",
           "to_image"]


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    params: FamParams | None = None      # None: not a high-res pass from the native image
    strength: float = 1.0                # plain Hires fix denoising strength


METHODS = {m.name: m for m in (
    Method("native", "native (training size)"),
    Method("direct", "direct at target size"),
    Method("hires_1.0", "Hires fix, strength 1.0", FamParams(), 1.0),
    Method("hires_0.5", "Hires fix, strength 0.5", FamParams(), 0.5),
    Method("fam", "FAM (defaults)", FamParams(enabled=True)),
    Method("fm_only", "FAM, FM only", FamParams(enabled=True, am_enabled=False)),
    Method("am_only", "FAM, AM only", FamParams(enabled=True, fm_enabled=False)),
)}
# The native pass with every self-attention layer's output 0: does the model need its
# attention for the world's structure? (The feasibility check of docs/quality.md.)
NO_ATTENTION = "native:attention=off"
_VARIANTS = {"lambda": ("am_lambda", float, "λ {}"), "blocks": ("am_blocks", str, "AM blocks {}"),
             "cutoff": ("fm_cutoff", float, "FM c {}")}
_VARIED = ("fam", "fm_only", "am_only")


def method(name: str) -> Method:
    """A method by name: one of METHODS, or FAM / FM only / AM only with settings changed,
    for the sweeps that choose the defaults: `fam:lambda=0.3`, `am_only:blocks=2,3` (ldm
    output-block indices, as FamParams.am_blocks takes them), `fm_only:cutoff=0.25` (FM's
    box), or several, `fam:blocks=2,3:lambda=0.3`."""
    if name in METHODS:
        return METHODS[name]
    if name == NO_ATTENTION:
        return Method(name, "native, self-attention off")
    base, *changes = name.split(":")
    pairs = [change.partition("=") for change in changes]
    if (base not in _VARIED or not pairs
            or any(key not in _VARIANTS or not value for key, _, value in pairs)
            or len({key for key, _, _ in pairs}) < len(pairs)):
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}, or "
                         f"{' / '.join(_VARIED)} with :lambda=<0-1>, :blocks=<i,j,...> and/or "
                         f":cutoff=<0-1>, or {NO_ATTENTION}")
    m = METHODS[base]
    try:
        params = m.params.replace(**{_VARIANTS[key][0]: _VARIANTS[key][1](value) for key, _, value in pairs})
    except ValueError as e:
        raise ValueError(f"method {name!r}: {e}") from None
    shown = {"lambda": f"{params.am_lambda:g}", "blocks": params.am_blocks, "cutoff": f"{params.fm_cutoff:g}"}
    labels = [_VARIANTS[key][2].format(shown[key]) for key, _, _ in pairs]
    return Method(name, ", ".join(["FAM" if base == "fam" else m.label, *labels]), params)


@dataclass
class ToyModel:
    world: World
    unet: torch.nn.Module
    scheduler: object
    prompt: torch.Tensor             # the fixed conditioning, (1, 2, 16)
    native: int                      # training size in pixels (= latent size: no VAE)
    steps: int
    guidance_scale: float
    meta: dict

    def cond(self, batch: int):
        """CFG conditioning for `batch` images: the world has one "prompt", used for both
        branches (guidance 1 samples the model as trained)."""
        from ..hosts.diffusers import CfgCond
        return CfgCond(self.prompt.expand(2 * batch, -1, -1).contiguous())

    def render(self, methods: Iterable[str], scale: float, seed: int, batch: int = 1,
               progress=None) -> dict[str, torch.Tensor]:
        """Images (batch, 3, H, W) in [0, 1] per method. The native pass depends only on
        (seed, batch), so every method shares it and the high-res noise; `progress()` is
        called after each method."""
        from ..hosts.diffusers import generate
        methods = list(methods)
        resolved = {name: method(name) for name in methods}
        hw = (round(self.native * scale),) * 2
        out: dict[str, torch.Tensor] = {}
        for name in methods:
            m = resolved[name]
            if name == "direct":
                out[name] = to_image(self.sample(hw, seed, batch))
            elif name == NO_ATTENTION:
                with self_attention_off(self.unet):
                    out[name] = to_image(self.sample((self.native,) * 2, seed, batch))
            elif m.params is not None:
                r = generate(self.unet, self.scheduler, self.cond(batch), native_hw=(self.native,) * 2,
                             hires_hw=hw, steps=self.steps, params=m.params,
                             guidance_scale=self.guidance_scale, seed=seed,
                             denoising_strength=m.strength)
                out[name] = to_image(r.hires)
                out.setdefault("native", to_image(r.native))
            if progress is not None and name != "native":
                progress()
        if "native" in methods and "native" not in out:
            out["native"] = to_image(self.sample((self.native,) * 2, seed, batch))
        if "native" in methods and progress is not None:
            progress()
        return {name: out[name] for name in methods}

    @torch.inference_mode()
    def sample(self, hw, seed: int, batch: int = 1) -> torch.Tensor:
        """Plain sampling at latent size `hw` (model space); at the native size this is the
        native pass of `generate` with the same seed."""
        from ..hosts.diffusers import generate
        r = generate(self.unet, self.scheduler, self.cond(batch), native_hw=hw, hires_hw=hw,
                     steps=self.steps, hires_steps=1, denoising_strength=0.0,
                     params=FamParams(), guidance_scale=self.guidance_scale, seed=seed)
        return r.native


class _Zero:
    """An attention processor whose output is 0: the residual stream skips the layer."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)


@contextmanager
def self_attention_off(unet: torch.nn.Module):
    """Every self-attention layer (`attn1`) of a diffusers UNet outputs 0 inside the block;
    the processors are restored on the way out, whatever happens."""
    layers = {name: m for name, m in unet.named_modules() if name.endswith("attn1")}
    saved = {name: m.processor for name, m in layers.items()}
    try:
        for m in layers.values():
            m.set_processor(_Zero())
        yield unet
    finally:
        for name, m in layers.items():
            m.set_processor(saved[name])


def load(world: str | int = "disc") -> ToyModel:
    """The shipped model of a world, by name ("disc", "stripes", "copies") or number (1–3)."""
    by_number = {w.number: w for w in WORLDS.values()}
    w = by_number.get(world) if isinstance(world, int) else WORLDS.get(world)
    if w is None:
        raise ValueError(f"unknown toy world {world!r}; choose from "
                         + ", ".join(f"{w.name!r} ({w.number})" for w in WORLDS.values()))
    ck = load_checkpoint(CHECKPOINTS / w.name)
    s = ck.meta["sampling"]
    return ToyModel(w, ck.unet, make_scheduler(ck.meta["scheduler"]), ck.prompt,
                    ck.meta["native"], s["steps"], s["guidance_scale"], ck.meta)
