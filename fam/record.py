"""What the native pass leaves for the high-res pass (docs/method.md §4).

Per native UNet evaluation σ: for every AM layer the normalised attn1 input of each row, keyed
by row role, never by row index. While the total stays within a byte budget the maps are
kept ("record path"); past it they are dropped and every entry keeps only the host's replay
payload (the native latent and conditioning of that call), from which the maps are rebuilt
by re-running the native UNet when the high-res pass needs them ("recompute path", exact)."""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import torch

__all__ = ["Role", "NativeEntry", "NativeRecord", "ReferenceRecord"]


class Role(NamedTuple):
    """What a row of a UNet batch is: image `image` of the batch, its cond branch (the
    `part`-th AND sub-prompt) or its uncond branch."""
    image: int
    uncond: bool = False
    part: int = 0

    def fallback(self) -> "Role":
        return Role(self.image, self.uncond, 0)


@dataclass
class NativeEntry:
    sigma: float
    maps: dict[str, dict[Role, torch.Tensor]] = field(default_factory=dict)
    replays: list[Any] = field(default_factory=list)

    def rows(self, layer: str, roles: Sequence[Role]) -> torch.Tensor | None:
        """Native attn1 inputs for `roles`, stacked (rows, n, C); None if one is missing."""
        by_role = self.maps.get(layer)
        if not by_role:
            return None
        picked = []
        for r in roles:
            t = by_role.get(r)
            if t is None:
                t = by_role.get(r.fallback())
            if t is None:
                return None
            picked.append(t)
        return torch.stack(picked)


def _log_sigma(sigma: float) -> float:
    return math.log(max(float(sigma), 1e-12))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class NativeRecord:
    """The native trajectory: entries sorted by σ, maps within `budget_bytes` or replays."""

    def __init__(self, budget_bytes: int, offload: bool = False):
        self.budget_bytes = budget_bytes
        self.offload = offload
        self.recompute = budget_bytes <= 0
        self.map_bytes = 0
        self._entries: dict[float, NativeEntry] = {}
        self._sorted: list[NativeEntry] = []
        self._keys: list[float] = []     # log σ of `_sorted`, for bisection

    # ---- native pass ----------------------------------------------------------------
    def entry(self, sigma: float) -> NativeEntry:
        """The entry of one native evaluation σ (split CFG calls at one σ share it)."""
        e = self._entries.get(sigma)
        if e is None:
            e = self._entries[sigma] = NativeEntry(sigma)
            self._sorted = sorted(self._entries.values(), key=lambda x: x.sigma)
            self._keys = [_log_sigma(x.sigma) for x in self._sorted]
        return e

    def add(self, entry: NativeEntry, layer: str, roles: Sequence[Role],
            hidden: torch.Tensor) -> None:
        if self.recompute:
            return
        size = _nbytes(hidden)
        if self.map_bytes + size > self.budget_bytes:
            self._switch_to_recompute()
            return
        if self.offload and hidden.device.type == "cuda":
            hidden = hidden.to("cpu", non_blocking=True)
        per_role = entry.maps.setdefault(layer, {})
        for r, row in zip(roles, hidden.unbind(0)):
            per_role[r] = row
        self.map_bytes += size

    def drop_replays(self) -> None:
        for e in self._entries.values():
            e.replays.clear()

    def _switch_to_recompute(self) -> None:
        self.recompute = True
        self.map_bytes = 0
        for e in self._entries.values():
            e.maps.clear()

    # ---- high-res pass --------------------------------------------------------------
    @property
    def sigmas(self) -> list[float]:
        return [e.sigma for e in self._sorted]

    def nearest(self, sigma: float) -> NativeEntry | None:
        """The native evaluation with the nearest σ (in log σ)."""
        if not self._sorted:
            return None
        keys, x = self._keys, _log_sigma(sigma)
        i = bisect.bisect_left(keys, x)
        cands = [j for j in (i - 1, i) if 0 <= j < len(keys)]
        return self._sorted[min(cands, key=lambda j: abs(keys[j] - x))]


class ReferenceRecord:
    """A native 'trajectory' made on demand from a clean native latent (img2img upscaling,
    the upscale button): at each high-res σ one entry whose replay is that σ itself; the
    host re-noises its reference latent to σ and runs the native UNet on it."""

    recompute = True
    map_bytes = 0

    def __init__(self):
        self._last: NativeEntry | None = None

    def nearest(self, sigma: float) -> NativeEntry:
        if self._last is None or self._last.sigma != sigma:
            self._last = NativeEntry(float(sigma), replays=[float(sigma)])
        return self._last
