"""One generation's FAM state: records the native pass, then guides the high-res pass.

Hosts drive it with four calls and nothing else:
  * `begin_call(sigma, roles, latent_hw, replay)` before every UNet evaluation,
  * `on_attn1(layer, hidden)` from every AM layer's self-attention (record, or hand back
    the native context to modulate with),
  * `guide_latent(x, sigma)` on the sampler's own latent before each high-res evaluation (FM),
  * `report()` for the infotext.
A new `FamRun` is made per generation and dropped afterwards: nothing outlives it."""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from typing import Any, Callable, Iterator, Sequence

import torch

from .attention import AmContext
from .frequency import frequency_modulate
from .layers import AttnLayer
from .params import FamParams
from .record import EntryMaps, Located, NativeEntry, NativeRecord, ReferenceRecord, Role, Segment
from .replay import Replayer, ReplayDone
from .schedule import VPSchedule, noised_reference
from .transfer import HostMemory, Prefetcher

__all__ = ["FamRun", "token_grid", "NATIVE", "HIRES"]

NATIVE, REPLAY, HIRES, IDLE = "native", "replay", "hires", "idle"


def token_grid(latent_hw, level: int) -> tuple[int, int]:
    """Token grid of a layer `level` halvings below the latent (ceil halving, as the UNets)."""
    h, w = latent_hw
    for _ in range(level):
        h, w = -(-h // 2), -(-w // 2)
    return h, w


class FamRun:
    """Phases idle → native → hires (→ idle at `end()`): in the native pass every AM layer's
    input is recorded per σ and row role; in the high-res pass each UNet call gets the native
    maps of the nearest native σ (from the record, or rebuilt by the `Replayer`) and FM
    edits the sampler's latent."""

    def __init__(self, params: FamParams, am_layers: Sequence[AttnLayer], schedule: VPSchedule):
        self.params = params
        self.schedule = schedule
        self.levels = {l.name: l.level for l in am_layers}
        self._channels = {l.name: _channels(l.module) for l in am_layers}
        self.phase = IDLE
        self.record: NativeRecord | ReferenceRecord | None = None
        self.memory = HostMemory()   # the record's host buffers (kept for inspection after end)
        self.native_hw: tuple[int, int] | None = None
        # current UNet evaluation
        self._sigma: float | None = None
        self._roles: tuple[Role, ...] = ()
        self._latent_hw: tuple[int, int] | None = None
        self._entry: NativeEntry | None = None      # native pass / replay: where calls record
        self._segment: Segment | None = None        # ... and this call's segment of it
        self._recorded: set[str] = set()
        self._maps: EntryMaps | None = None         # high-res pass: this call's native maps
        self._located: Located | None = None        # ... and where its rows are in them
        # high-res pass
        self._z0 = self._eps = None
        self._vp = False
        self._replayer: Replayer | None = None
        self._replay_can_stop = False
        self._prefetch: Prefetcher | None = None
        # what happened, for the infotext and the benchmark
        self.am_calls = 0
        self.am_skipped: Counter[str] = Counter()
        self.am_borrowed = 0   # AM calls with a row on its image's other CFG branch's map
        self.am_partial = 0    # AM calls that left rows without any native map unmodulated
        self.fm_calls = 0
        self.stats: dict[str, int] = {}

    @property
    def replays(self) -> int:
        """Native calls re-run in the high-res pass (recompute path)."""
        return self._replayer.replays if self._replayer is not None else 0

    # ---- phases ---------------------------------------------------------------------
    def begin_native(self) -> None:
        self.phase = NATIVE
        p = self.params
        self.record = NativeRecord(p.record_budget_bytes if p.am_active else 0,
                                   offload=p.record_offload)
        self.memory = self.record.memory

    def begin_hires(self, z0: torch.Tensor, eps: torch.Tensor, *, vp: bool = False,
                    replay_fn: Callable[[Any], None] | None = None,
                    replay_can_stop: bool = False,
                    reference_native_hw: tuple[int, int] | None = None) -> None:
        """z0: the upsampled native latent z̃₀, eps: the one noise tensor ε of the pass.
        `replay_fn(payload)` re-runs one recorded native UNet call (recompute path). With
        `reference_native_hw` there was no native pass: the maps come from `replay_fn(σ)`."""
        if reference_native_hw is not None:
            if self.record is not None:
                self.record.release()
            self.record, self.native_hw = ReferenceRecord(), tuple(reference_native_hw)
        elif self.record is not None:
            self.record.finish()
            self.stats["record_bytes"] = self.record.map_bytes
            rec = self.record
            if not rec.recompute and rec.offload:
                self._prefetch = Prefetcher(rec.entries, rec.below, rec.streams, z0.device)
        self.phase = HIRES
        self._z0, self._eps, self._vp = z0, eps, vp
        self._replay_can_stop = replay_can_stop
        if replay_fn is not None:
            self._replayer = Replayer(replay_fn, self._recording_into)

    def end(self) -> None:
        """Drop everything the run holds and give back the record's memory (called from the
        host's `finally`)."""
        self.phase = IDLE
        if self._prefetch is not None:
            self.stats.update(prefetched=self._prefetch.prefetched, loaded=self._prefetch.loaded)
        if self.record is not None:
            self.record.release()
        self.record = None
        self._z0 = self._eps = self._maps = self._located = self._entry = self._segment = None
        self._prefetch = None
        if self._replayer is not None:
            self._replayer.close()

    # ---- per UNet evaluation --------------------------------------------------------
    def begin_call(self, sigma: float, roles: Sequence[Role], latent_hw,
                   replay: Any = None) -> None:
        sigma, roles, latent_hw = float(sigma), tuple(roles), tuple(latent_hw)
        self._recorded = set()
        self._segment = None
        if self.phase == NATIVE:
            self.record.close()
            self.native_hw = latent_hw
            self._entry = self.record.entry(sigma)
            if replay is not None and self.params.am_active:
                self._entry.replays.append(replay)
        elif self.phase == HIRES:
            self._maps, self._located = self._ready_maps(sigma, roles)
        self._sigma, self._roles, self._latent_hw = sigma, roles, latent_hw

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
        level = self.levels.get(layer)
        if level is None or self._entry is None:
            return
        h, w = token_grid(self._latent_hw, level)
        if hidden.shape[0] != len(self._roles) or hidden.shape[1] != h * w:
            self.am_skipped["native call not recordable (rows or tokens changed)"] += 1
            return
        if self._segment is None:
            self._segment = self._open_segment(hidden)
            if self._segment is None:
                return   # over the budget: the recompute path needs no maps
        if not self._segment.write(layer, hidden.detach()):
            self.am_skipped["native call not recordable (channels changed)"] += 1
            return
        self._recorded.add(layer)
        if self.phase == REPLAY and self._replay_can_stop and self._recorded >= self.levels.keys():
            raise ReplayDone

    def _open_segment(self, hidden: torch.Tensor) -> Segment | None:
        """Plan this call's segment (every AM layer, in one buffer) and give it storage: the
        record's within its budget, or scratch device memory for a replay."""
        rows = len(self._roles)
        shapes = {name: (rows, math.prod(token_grid(self._latent_hw, level)),
                         self._channels[name] or hidden.shape[-1])
                  for name, level in self.levels.items()}
        segment = Segment.plan(self._roles, shapes, hidden.dtype)
        if self.phase == NATIVE:
            return self.record.open(self._entry, segment, hidden.device)
        segment.data = torch.empty(segment.numel, dtype=segment.dtype, device=hidden.device)
        self._entry.segments.append(segment)
        return segment

    def _ready_maps(self, sigma: float, roles: tuple[Role, ...]):
        """The native maps for σ on the compute device and where `roles` are in them: a view
        of the record, a prefetched slot (offloaded record), or rebuilt by replay."""
        if not self.params.am_active or self.record is None:
            return None, None
        entry = self.record.nearest(sigma)
        if entry is None or not (entry.segments or entry.replays):
            return None, None   # e.g. a native step the refiner ran: nothing was recorded
        if self.record.recompute:
            rebuilt = self._replayer.maps(entry, roles) if self._replayer is not None else None
            return rebuilt or (None, None)
        if self._prefetch is not None:
            flats = self._prefetch.flats(entry)
        else:
            flats = [s.data for s in entry.segments]
        return EntryMaps(entry, flats), entry.locate(roles, borrow=True)

    @contextlib.contextmanager
    def _recording_into(self, entry: NativeEntry) -> Iterator[None]:
        """A replayed native call records into `entry` (the replayer's scratch)."""
        self.phase, self._entry, self._segment = REPLAY, entry, None
        try:
            yield
        finally:
            self.phase, self._entry, self._segment = HIRES, None, None

    def _context(self, layer: str, hidden: torch.Tensor):
        level = self.levels.get(layer)
        if level is None:
            return None, "not an AM layer"
        if self._maps is None:
            replayer = self._replayer
            return None, (replayer and replayer.unavailable) or "no native record for this step"
        grid = token_grid(self._latent_hw, level)
        if hidden.shape[1] != grid[0] * grid[1]:
            return None, "token grid changed (token merging / hypertile)"
        if hidden.shape[0] != len(self._roles):
            return None, "batch rows do not match the CFG layout"
        located = self._located
        native = None if located is None else self._maps.rows(layer, located.runs)
        if native is None:
            return None, "no native map for the call's rows"
        native_grid = token_grid(self.native_hw, level)
        if native.shape[1] != native_grid[0] * native_grid[1]:
            return None, "native token grid mismatch"
        self.am_borrowed += located.borrowed > 0
        self.am_partial += located.rows is not None
        return AmContext(native.to(hidden.device, hidden.dtype), grid, native_grid,
                         self.params.am_lambda, located.rows), None

    def report(self) -> dict[str, str]:
        """Infotext entries describing what FAM actually did (skips and fallbacks)."""
        out = {}
        if self.record is not None and self.params.am_active and self.record.recompute:
            out["FAM AM path"] = "recompute"
        memory, record_notes = self.memory, []
        if memory.unpinned_bytes:
            record_notes.append(f"{memory.unpinned_bytes / 2**20:.1f} MiB pageable (page-locked "
                                "memory kept under half the RAM free at the start): "
                                "their copies are synchronous")
        if memory.pin_failed:
            record_notes.append("not page-locked (cudaHostRegister failed): copies are synchronous")
        if record_notes:
            out["FAM record"] = "; ".join(record_notes)
        fallbacks = []
        if self.am_borrowed:
            fallbacks.append(f"{self.am_borrowed} of {self.am_calls} calls: rows of a CFG branch "
                             "the first pass did not run took their image's other branch's map")
        if self.am_partial:
            fallbacks.append(f"{self.am_partial} of {self.am_calls} calls: rows whose image has "
                             "no native map kept their own attention")
        if fallbacks:
            out["FAM AM fallback"] = "; ".join(fallbacks)
        skipped = sum(self.am_skipped.values())
        if skipped:
            reasons = "; ".join(f"{n}x {r}" for r, n in self.am_skipped.most_common())
            out["FAM AM skipped"] = f"{skipped} of {skipped + self.am_calls} calls ({reasons})"
        return out


def _channels(module: torch.nn.Module) -> int | None:
    """Input width of an attn1 layer (its to_q), None when the module does not say."""
    return getattr(getattr(module, "to_q", None), "in_features", None)
