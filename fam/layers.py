"""Find a UNet's self-attention (attn1) layers by module name, in ldm/sgm/Forge naming
(`output_blocks.{i}.1.transformer_blocks.{t}.attn1`) and diffusers naming
(`up_blocks.{i}.attentions.{j}.transformer_blocks.{t}.attn1`), and resolve FAM's AM layers."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

__all__ = ["AttnLayer", "UNetLayout", "discover", "LayerSelectionError"]

_LDM = re.compile(
    r"(?:^|\.)(?:(?P<kind>input_blocks|output_blocks)\.(?P<i>\d+)|(?P<mid>middle_block))"
    r"\.1\.transformer_blocks\.(?P<t>\d+)\.attn1$")
_DIFFUSERS = re.compile(
    r"(?:^|\.)(?:(?P<kind>down_blocks|up_blocks)\.(?P<i>\d+)\.attentions\.(?P<j>\d+)"
    r"|(?P<mid>mid_block)\.attentions\.0)\.transformer_blocks\.(?P<t>\d+)\.attn1$")
_LDM_BLOCK = re.compile(r"(?:^|\.)(input_blocks|output_blocks)\.(\d+)\.(\d+)$")
_DIFFUSERS_RESNET = re.compile(r"(?:^|\.)(down_blocks|up_blocks)\.(\d+)\.resnets\.(\d+)$")


class LayerSelectionError(ValueError):
    """The requested AM layers do not exist in this model."""


@dataclass(frozen=True)
class AttnLayer:
    name: str            # full module path, as named_modules() gives it
    module: torch.nn.Module
    block: str           # "input" | "middle" | "output"
    index: int           # ldm block index (input/output_blocks.{index}); 0 for middle
    transformer: int     # transformer_blocks.{t}
    level: int           # halvings of the latent: tokens = ceil-halved latent grid
    heads: int


@dataclass(frozen=True)
class UNetLayout:
    naming: str                          # "ldm" or "diffusers"
    layers: tuple[AttnLayer, ...]        # every attn1 layer, in module order
    output_groups: tuple[tuple[int, ...], ...]   # output block indices per up-block

    def default_am_blocks(self) -> tuple[int, ...]:
        """FAM's default: every output block of the first up-block that has attention."""
        with_attn = {l.index for l in self.layers if l.block == "output"}
        for group in self.output_groups:
            if with_attn.intersection(group):
                return tuple(i for i in group if i in with_attn)
        raise LayerSelectionError("this UNet has no self-attention in its up-blocks")

    def am_layers(self, blocks: Sequence[int] | None = None,
                  model_name: str = "this model") -> tuple[AttnLayer, ...]:
        """attn1 layers of the given output blocks (None: the default blocks)."""
        chosen = tuple(self.default_am_blocks() if blocks is None else blocks)
        found = tuple(l for l in self.layers if l.block == "output" and l.index in chosen)
        missing = sorted(set(chosen) - {l.index for l in found})
        if missing:
            have = sorted({l.index for l in self.layers if l.block == "output"})
            raise LayerSelectionError(
                f"FAM AM blocks {missing} have no self-attention in {model_name}; "
                f"output blocks with attention: {have}")
        return found


def discover(model: torch.nn.Module) -> UNetLayout:
    """Walk `model.named_modules()` once and describe its attn1 layers."""
    named = list(model.named_modules())
    ldm = [(n, m, _LDM.search(n)) for n, m in named]
    ldm = [x for x in ldm if x[2]]
    if ldm:
        return _ldm_layout(named, ldm)
    dif = [(n, m, _DIFFUSERS.search(n)) for n, m in named]
    dif = [x for x in dif if x[2]]
    if dif:
        return _diffusers_layout(named, dif)
    raise LayerSelectionError(
        f"{type(model).__name__} has no attn1 layers with ldm/sgm or diffusers UNet names; "
        "FAM supports SD1.x, SD2.x and SDXL UNets")


def _heads(m: torch.nn.Module) -> int:
    return int(getattr(m, "heads", 0) or getattr(m, "num_heads", 0))


def _groups(counts: Iterable[int]) -> list[list[int]]:
    out, start = [], 0
    for c in counts:
        out.append(list(range(start, start + c)))
        start += c
    return out


def _ldm_layout(named, matches) -> UNetLayout:
    # a new level starts after each block that holds a Downsample / Upsample child
    children = {}
    for n, m in named:
        k = _LDM_BLOCK.search(n)
        if k:
            children.setdefault((k.group(1), int(k.group(2))), []).append(type(m).__name__)
    n_in = 1 + max((i for (kind, i) in children if kind == "input_blocks"), default=-1)
    n_out = 1 + max((i for (kind, i) in children if kind == "output_blocks"), default=-1)
    in_level, lvl = [], 0
    for i in range(n_in):
        names = children.get(("input_blocks", i), [])
        is_down = any("Downsample" in c for c in names)
        in_level.append(lvl if not is_down else lvl + 1)
        lvl += is_down
    depth = lvl
    groups, current = [], []
    for i in range(n_out):
        current.append(i)
        if any("Upsample" in c for c in children.get(("output_blocks", i), [])):
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    out_level = {i: depth - g for g, grp in enumerate(groups) for i in grp}
    layers = []
    for n, m, k in matches:
        if k.group("mid"):
            block, idx, level = "middle", 0, depth
        elif k.group("kind") == "input_blocks":
            block, idx = "input", int(k.group("i"))
            level = in_level[idx]
        else:
            block, idx = "output", int(k.group("i"))
            level = out_level[idx]
        layers.append(AttnLayer(n, m, block, idx, int(k.group("t")), level, _heads(m)))
    return UNetLayout("ldm", tuple(layers), tuple(tuple(g) for g in groups))


def _diffusers_layout(named, matches) -> UNetLayout:
    resnets: dict[tuple[str, int], int] = {}
    for n, _ in named:
        k = _DIFFUSERS_RESNET.search(n)
        if k:
            key = (k.group(1), int(k.group(2)))
            resnets[key] = max(resnets.get(key, 0), int(k.group(3)) + 1)
    n_down = 1 + max((i for (kind, i) in resnets if kind == "down_blocks"), default=-1)
    n_up = 1 + max((i for (kind, i) in resnets if kind == "up_blocks"), default=-1)
    depth = n_down - 1
    down_counts = [resnets.get(("down_blocks", i), 0) for i in range(n_down)]
    up_groups = _groups(resnets.get(("up_blocks", i), 0) for i in range(n_up))
    layers = []
    for n, m, k in matches:
        t = int(k.group("t"))
        if k.group("mid"):
            layers.append(AttnLayer(n, m, "middle", 0, t, depth, _heads(m)))
            continue
        i, j = int(k.group("i")), int(k.group("j"))
        if k.group("kind") == "down_blocks":
            # ldm input block numbering: conv_in, then per level its resnets and a downsample
            idx = 1 + sum(c + 1 for c in down_counts[:i]) + j
            layers.append(AttnLayer(n, m, "input", idx, t, i, _heads(m)))
        else:
            layers.append(AttnLayer(n, m, "output", up_groups[i][j], t, depth - i, _heads(m)))
    return UNetLayout("diffusers", tuple(layers), tuple(tuple(g) for g in up_groups))
