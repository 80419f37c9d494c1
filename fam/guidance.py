"""One generation's FAM state: records the native pass, then guides the high-res pass.

Hosts drive it with four calls and nothing else:
  * `begin_call(sigma, roles, latent_hw, replay)` before every UNet evaluation,
  * `on_attn1(layer, hidden)` from every AM layer's self-attention (record, or hand back
    the native context to modulate with),
  * `guide_latent(x, sigma)` on the sampler's own latent before each high-res evaluation (FM),
  * `report()` for the infotext.
A new `FamRun` is made per generation and dropped afterwards: nothing outlives it."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Callable, Sequence

import torch

from .attention import AmContext
from .frequency import frequency_modulate
from .layers import AttnLayer
from .params import FamParams
from .record import NativeEntry, NativeRecord, ReferenceRecord, Role
from .schedule import VPSchedule, noised_reference

__all__ = ["FamRun", "ReplayUnavailable", "token_grid"]

NATIVE, REPLAY, HIRES, IDLE = "native", "replay", "hires", "idle"


def token_grid(latent_hw, level: int) -> tuple[int, int]:
    """Token grid of a layer `level` halvings below the latent (ceil halving, as the UNets)."""
    h, w = latent_hw
    for _ in range(level):
        h, w = -(-h // 2), -(-w // 2)
    return h, w


class _ReplayDone(Exception):
    """Raised inside a replayed native UNet once every AM layer is recorded: the rest of
    the network is not needed."""


class ReplayUnavailable(Exception):
    """Raised by a host's replay function when native calls cannot be re-run in this pass
    (e.g. a UNet hook holds high-res inputs). The message becomes the skip reason of every
    AM call that needed a replay; no replay is tried again."""


class FamRun:
    def __init__(self, params: FamParams, am_layers: Sequence[AttnLayer], schedule: VPSchedule):
        self.params = params
        self.schedule = schedule
        self.levels = {l.name: l.level for l in am_layers}
        self.phase = IDLE
        self.record: NativeRecord | ReferenceRecord | None = None
        self.native_hw: tuple[int, int] | None = None
        # current UNet evaluation
        self._sigma: float | None = None
        self._roles: tuple[Role, ...] = ()
        self._latent_hw: tuple[int, int] | None = None
        self._entry: NativeEntry | None = None
        self._recorded: set[str] = set()
        # high-res pass
        self._z0 = self._eps = None
        self._vp = False
        self._replay_fn: Callable[[Any], None] | None = None
        self._replay_can_stop = False
        self._maps: NativeEntry | None = None   # the entry whose maps are ready on device
        self._no_maps_reason = "no native record for this step"
        self._device: torch.device | None = None
        # what happened, for the infotext
        self.am_calls = 0
        self.am_skipped: Counter[str] = Counter()
        self.fm_calls = 0
        self.replays = 0

    # ---- phases ---------------------------------------------------------------------
    def begin_native(self) -> None:
        self.phase = NATIVE
        p = self.params
        self.record = NativeRecord(p.record_budget_bytes if p.am_active else 0,
                                   offload=p.record_offload)

    def begin_hires(self, z0: torch.Tensor, eps: torch.Tensor, *, vp: bool = False,
                    replay_fn: Callable[[Any], None] | None = None,
                    replay_can_stop: bool = False,
                    reference_native_hw: tuple[int, int] | None = None) -> None:
        """z0: the upsampled native latent z̃₀, eps: the one noise tensor ε of the pass.
        `replay_fn(payload)` re-runs one recorded native UNet call (recompute path). With
        `reference_native_hw` there was no native pass: the maps come from `replay_fn(σ)`."""
        if reference_native_hw is not None:
            self.record, self.native_hw = ReferenceRecord(), tuple(reference_native_hw)
        elif self.record is not None and not self.record.recompute:
            self.record.drop_replays()   # every map fits: the native inputs are not needed
        self.phase = HIRES
        self._z0, self._eps, self._vp = z0, eps, vp
        self._replay_fn, self._replay_can_stop = replay_fn, replay_can_stop
        self._device = z0.device

    def end(self) -> None:
        """Drop everything the run holds (called from the host's `finally`)."""
        self.phase = IDLE
        self.record = None
        self._z0 = self._eps = self._maps = self._entry = None
        self._replay_fn = None

    # ---- per UNet evaluation --------------------------------------------------------
    def begin_call(self, sigma: float, roles: Sequence[Role], latent_hw,
                   replay: Any = None) -> None:
        sigma = float(sigma)
        self._sigma, self._roles, self._latent_hw = sigma, tuple(roles), tuple(latent_hw)
        self._recorded = set()
        if self.phase == NATIVE:
            self.native_hw = self._latent_hw
            self._entry = self.record.entry(sigma)
            if replay is not None and self.params.am_active:
                self._entry.replays.append(replay)
        elif self.phase == HIRES:
            self._maps = self._ready_maps(sigma)
            self._sigma, self._roles, self._latent_hw = sigma, tuple(roles), tuple(latent_hw)

    def on_attn1(self, layer: str, hidden: torch.Tensor) -> AmContext | None:
        """Called with the normalised attn1 input (rows, tokens, C) of an AM layer. Returns
        the context to modulate with, or None: run the layer's own attention."""
        if not self.params.am_active:
            return None
        if self.phase in (NATIVE, REPLAY):
            self._record(layer, hidden)
            return None
        if self.phase != HIRES:
            return None
        ctx, reason = self._context(layer, hidden)
        if ctx is None:
            self.am_skipped[reason] += 1
        else:
            self.am_calls += 1
        return ctx

    def guide_latent(self, x: torch.Tensor, sigma: float) -> None:
        """FM, in place on the sampler's latent x (B, C, H, W) at σ (docs/method.md §1 step 4)."""
        if self.phase != HIRES or not self.params.fm_enabled or self.native_hw is None:
            return
        z_ref = noised_reference(self._z0, self._eps, sigma, vp=self._vp)
        rho = self.schedule.rho(sigma)
        x.copy_(frequency_modulate(x, z_ref, rho, self.native_hw, self.params.fm_cutoff))
        self.fm_calls += 1

    # ---- internals ------------------------------------------------------------------
    def _record(self, layer: str, hidden: torch.Tensor) -> None:
        if layer not in self.levels or self._entry is None:
            return
        grid = token_grid(self._latent_hw, self.levels[layer])
        if hidden.shape[0] != len(self._roles) or hidden.shape[1] != grid[0] * grid[1]:
            self.am_skipped["native call not recordable (rows or tokens changed)"] += 1
            return
        if self.phase == NATIVE:
            self.record.add(self._entry, layer, self._roles, hidden.detach())
        else:  # replay: a scratch entry, no budget
            per_role = self._entry.maps.setdefault(layer, {})
            per_role.update(zip(self._roles, hidden.detach().unbind(0)))
        self._recorded.add(layer)
        if self.phase == REPLAY and self._replay_can_stop and self._recorded >= self.levels.keys():
            raise _ReplayDone

    def _ready_maps(self, sigma: float) -> NativeEntry | None:
        """The native entry for σ with its maps on the compute device, rebuilt by replay on
        the recompute path; one entry is cached (split CFG calls and repeated σ reuse it)."""
        if not self.params.am_active or self.record is None:
            return None
        entry = self.record.nearest(sigma)
        if entry is None or not (entry.maps or entry.replays):
            return None   # e.g. a native step the refiner ran: nothing was recorded
        cached = self._maps if self._maps is not None and self._maps.sigma == entry.sigma else None
        if cached is not None and (not self.record.recompute or self._covers(cached)):
            return cached
        if self.record.recompute:
            # a replay may cover only its own call's rows (reference path): a split CFG call
            # at the same σ (cond chunk, then uncond) adds its rows to the cached entry
            return self._replay(entry, cached)
        on_device = NativeEntry(entry.sigma)
        for layer, per_role in entry.maps.items():
            on_device.maps[layer] = {r: t.to(self._device, non_blocking=True)
                                     for r, t in per_role.items()}
        return on_device

    def _covers(self, maps: NativeEntry) -> bool:
        by_role = next(iter(maps.maps.values()), {})
        return all(r in by_role or r.fallback() in by_role for r in self._roles)

    def _replay(self, entry: NativeEntry, scratch: NativeEntry | None = None) -> NativeEntry | None:
        if self._replay_fn is None or not entry.replays:
            return None
        scratch = scratch or NativeEntry(entry.sigma)
        self.phase = REPLAY
        try:
            for payload in entry.replays:
                self._entry = scratch
                try:
                    self._replay_fn(payload)
                except _ReplayDone:
                    pass
                except ReplayUnavailable as e:
                    self._replay_fn, self._no_maps_reason = None, str(e)
                    return None
                self.replays += 1
        finally:
            self.phase = HIRES
            self._entry = None
        return scratch

    def _context(self, layer: str, hidden: torch.Tensor):
        level = self.levels.get(layer)
        if level is None:
            return None, "not an AM layer"
        if self._maps is None:
            return None, self._no_maps_reason
        grid = token_grid(self._latent_hw, level)
        if hidden.shape[1] != grid[0] * grid[1]:
            return None, "token grid changed (token merging / hypertile)"
        if hidden.shape[0] != len(self._roles):
            return None, "batch rows do not match the CFG layout"
        native = self._maps.rows(layer, self._roles)
        if native is None:
            return None, "no native map for a row's role"
        native_grid = token_grid(self.native_hw, level)
        if native.shape[1] != native_grid[0] * native_grid[1]:
            return None, "native token grid mismatch"
        return AmContext(native.to(hidden.dtype), grid, native_grid,
                         self.params.am_lambda), None

    def report(self) -> dict[str, str]:
        """Infotext entries describing what FAM actually did (skips and fallbacks)."""
        out = {}
        if self.record is not None and self.params.am_active and self.record.recompute:
            out["FAM AM path"] = "recompute"
        skipped = sum(self.am_skipped.values())
        if skipped:
            reasons = "; ".join(f"{n}x {r}" for r, n in self.am_skipped.most_common())
            out["FAM AM skipped"] = f"{skipped} of {skipped + self.am_calls} calls ({reasons})"
        return out
