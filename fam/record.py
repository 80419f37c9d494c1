"""What the native pass leaves for the high-res pass (docs/method.md §4).

Per native UNet evaluation σ an entry; per UNet call at that σ a segment: the normalised attn1
inputs of every AM layer for the call's rows in ONE flat buffer, layer after layer, each
(rows, tokens, C) in the call's row order. A high-res call with the same rows reads a view of
it (no stacking); rows are found by role, never by index. While the total stays within a byte
budget the maps are kept ("record path"); past it they are dropped and every entry keeps only
the host's replay payloads, from which the maps are rebuilt by re-running the native UNet
("recompute path", exact).

Offloaded (a CUDA record kept in host memory): each segment is written on the device into a
staging buffer, then copied on a side stream into its host buffer (`fam.transfer`), allocated
off the critical path; `release()` gives every byte back."""

from __future__ import annotations

import bisect
import math
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import torch

from .transfer import HostMemory, Streams, pin_limit
from .schedule import log_sigma as _log_sigma

__all__ = ["Role", "Segment", "NativeEntry", "Located", "EntryMaps", "NativeRecord",
           "ReferenceRecord"]

_MAX_STAGED = 2          # offload: segments waiting on the device for their host buffer


class Role(NamedTuple):
    """What a row of a UNet batch is: image `image` of the batch, its cond branch (the
    `part`-th AND sub-prompt) or its uncond branch."""
    image: int
    uncond: bool = False
    part: int = 0

    def fallback(self) -> "Role":
        return Role(self.image, self.uncond, 0)

    def other_branch(self) -> "Role":
        return Role(self.image, not self.uncond, 0)


class Slice(NamedTuple):
    offset: int                       # elements into the segment's flat buffer
    shape: tuple[int, int, int]       # rows, tokens, channels


@dataclass(eq=False)
class Segment:
    """The AM-layer inputs of one native UNet call, in one flat buffer."""
    roles: tuple[Role, ...]
    layout: dict[str, Slice]
    numel: int
    dtype: torch.dtype
    data: torch.Tensor | None = None      # where the maps are written: the compute device, or host
    host: torch.Tensor | None = None      # offload: the host buffer they end up in
    pending: Future | None = None         # offload: that buffer, while it is being allocated
    written: Any = None                   # offload: event after the call's last write
    recorded: set[str] = field(default_factory=set)

    @classmethod
    def plan(cls, roles: Sequence[Role], shapes: dict[str, tuple[int, int, int]],
             dtype: torch.dtype) -> "Segment":
        layout, at = {}, 0
        for name, shape in shapes.items():
            layout[name] = Slice(at, shape)
            at += math.prod(shape)
        return cls(tuple(roles), layout, at, dtype)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def view(self, flat: torch.Tensor, layer: str) -> torch.Tensor:
        offset, shape = self.layout[layer]
        return flat[offset:offset + math.prod(shape)].view(shape)

    def write(self, layer: str, hidden: torch.Tensor) -> bool:
        """Copy one layer's input into place; False if the call's shape does not fit the plan."""
        slot = self.layout.get(layer)
        if slot is None or tuple(hidden.shape) != slot.shape:
            return False
        self.view(self.data, layer).copy_(hidden)
        self.recorded.add(layer)
        return True


class Located(NamedTuple):
    """Where a call's rows are in an entry: `runs` (segment, start, stop) over the rows that
    have a map, in order; `rows` their indices in the call (None: every row); `borrowed`:
    rows whose role was not recorded and that take their image's other CFG branch."""
    runs: tuple[tuple[int, int, int], ...]
    rows: tuple[int, ...] | None = None
    borrowed: int = 0


@dataclass(eq=False)
class NativeEntry:
    sigma: float
    segments: list[Segment] = field(default_factory=list)
    replays: list[Any] = field(default_factory=list)
    _where: dict[Role, tuple[int, int]] | None = field(default=None, repr=False)
    _indexed: int = field(default=0, repr=False)

    def locate(self, roles: Sequence[Role], borrow: bool = False) -> Located | None:
        """Where the rows of `roles` are — one run when the call has the rows of a native
        call in its order. An AND part without its own native row takes its image's first
        cond row. A role never recorded (the passes' CFG differ: a first pass at CFG 1, a
        skipped uncond) is None, or with `borrow` takes its image's other branch; a row whose
        image has no row at all is left out of `rows`. None when no row has a map."""
        if self._where is None or self._indexed != len(self.segments):
            self._where = {r: (s, i) for s, seg in enumerate(self.segments)
                           for i, r in enumerate(seg.roles)}
            self._indexed = len(self.segments)
        runs: list[list[int]] = []
        rows, borrowed = [], 0
        for row, r in enumerate(roles):
            at = self._where.get(r) or self._where.get(r.fallback())
            if at is None and borrow:
                at = self._where.get(r.other_branch())
                borrowed += at is not None
            if at is None:
                if not borrow:
                    return None
                continue
            rows.append(row)
            s, i = at
            if runs and runs[-1][0] == s and runs[-1][2] == i:
                runs[-1][2] = i + 1
            else:
                runs.append([s, i, i + 1])
        if not rows:
            return None
        return Located(tuple(tuple(run) for run in runs),
                       None if len(rows) == len(roles) else tuple(rows), borrowed)


class EntryMaps:
    """An entry's maps where the AM layers can read them: one flat buffer per segment."""

    def __init__(self, entry: NativeEntry, flats: Sequence[torch.Tensor]):
        self.entry, self.flats = entry, tuple(flats)

    def rows(self, layer: str, runs) -> torch.Tensor | None:
        """(rows, n, C) for the runs of a `Located`: a view when it is one run."""
        parts = []
        for s, start, stop in runs:
            seg = self.entry.segments[s]
            if layer not in seg.recorded:
                return None
            parts.append(seg.view(self.flats[s], layer)[start:stop])
        return parts[0] if len(parts) == 1 else torch.cat(parts)




class NativeRecord:
    """The native trajectory: entries sorted by σ, maps within `budget_bytes` or replays.
    `offload`: keep the maps of a CUDA record in host memory (`offload_devices` lists the
    device types this applies to; tests add "cpu" to run the same path without CUDA)."""

    offload_devices: tuple[str, ...] = ("cuda",)

    def __init__(self, budget_bytes: int, offload: bool = False):
        self.budget_bytes = budget_bytes
        self.offload_wanted = offload
        self.offload = False
        self.recompute = budget_bytes <= 0
        self.map_bytes = 0
        self.device: torch.device | None = None
        self.memory = HostMemory()
        self.streams: Streams | None = None
        self._entries: dict[float, NativeEntry] = {}
        self._sorted: list[NativeEntry] = []
        self._keys: list[float] = []     # log σ of `_sorted`, for bisection
        self._open: Segment | None = None
        self._staged: list[Segment] = []

    # ---- native pass ----------------------------------------------------------------
    def entry(self, sigma: float) -> NativeEntry:
        """The entry of one native evaluation σ (split CFG calls at one σ share it)."""
        e = self._entries.get(sigma)
        if e is None:
            e = self._entries[sigma] = NativeEntry(sigma)
            self._sorted = sorted(self._entries.values(), key=lambda x: x.sigma)
            self._keys = [_log_sigma(x.sigma) for x in self._sorted]
        return e

    def open(self, entry: NativeEntry, segment: Segment, device: torch.device) -> Segment | None:
        """Give `segment` (one native call's plan) its storage within the budget; None once
        the record has switched to the recompute path. A call at a σ already recorded with
        the same rows (Heun's repeated σ) writes over that segment: the last call wins."""
        self.close()
        if self.recompute:
            return None
        same = next((s for s in entry.segments if (s.roles, s.layout, s.dtype)
                     == (segment.roles, segment.layout, segment.dtype)), None)
        if same is not None:
            return self._reopen(same, device)
        if self.map_bytes + segment.nbytes > self.budget_bytes:
            self._switch_to_recompute()
            return None
        if self.device is None:
            self._start(device)
        if self.offload:
            segment.data = torch.empty(segment.numel, dtype=segment.dtype, device=device)
            segment.pending = self.memory.request(segment.numel, segment.dtype)
        elif device.type == "cpu":
            segment.data = self.memory.allocate(segment.numel, segment.dtype)
        else:
            segment.data = torch.empty(segment.numel, dtype=segment.dtype, device=device)
        entry.segments.append(segment)
        self.map_bytes += segment.nbytes
        self._open = segment
        return segment

    def _reopen(self, segment: Segment, device: torch.device) -> Segment:
        if segment in self._staged:       # not copied yet: its copy will take the new values
            self._staged.remove(segment)
        elif segment.data is None:        # copied: stage again, into the same host buffer
            segment.data = torch.empty(segment.numel, dtype=segment.dtype, device=device)
        self._open = segment
        return segment

    def _start(self, device: torch.device) -> None:
        self.device = device
        self.offload = self.offload_wanted and device.type in self.offload_devices
        self.streams = Streams(device)
        if self.offload:   # the free RAM now bounds what the record may page-lock
            self.memory.pin_limit = pin_limit()
        if self.offload and device.type == "cuda":
            self.memory.pin, self.memory.device = True, device

    def close(self) -> None:
        """The open segment's call is over: stage it for its copy to host memory."""
        seg, self._open = self._open, None
        if seg is not None and self.offload:
            seg.written = self.streams.mark()
            self._staged.append(seg)
        self._flush(wait=False)

    def _flush(self, wait: bool) -> None:
        """Copy staged segments whose host buffer exists (all of them with `wait`, and the
        oldest while too many wait) and drop their device copy."""
        while self._staged:
            seg = self._staged[0]
            ready = seg.pending is None or seg.pending.done()
            if not (wait or ready or len(self._staged) > _MAX_STAGED):
                break
            self._staged.pop(0)
            if seg.pending is not None:
                seg.host, seg.pending = seg.pending.result(), None
            self.streams.copy([(seg.host, seg.data)], after=seg.written)
            seg.data = seg.written = None

    def finish(self) -> None:
        """End of the native pass: every map in its final place; replays dropped if unused."""
        self.close()
        self._flush(wait=True)
        if not self.recompute:
            for e in self._entries.values():
                e.replays.clear()

    def release(self) -> None:
        """Give back every buffer (the host's `finally`); waits for copies still running."""
        self._open = None
        self._staged.clear()
        if self.streams is not None:
            self.streams.synchronize()
        for e in self._entries.values():
            for seg in e.segments:
                seg.data = seg.host = seg.pending = seg.written = None
        self.memory.release()

    def _switch_to_recompute(self) -> None:
        self.recompute = True
        self.map_bytes = 0
        self._open = None
        self._staged.clear()
        for e in self._entries.values():
            e.segments.clear()
        if self.streams is not None:
            self.streams.synchronize()
        self.memory.release()

    # ---- high-res pass --------------------------------------------------------------
    @property
    def entries(self) -> list[NativeEntry]:
        return list(self._sorted)

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

    def below(self, entry: NativeEntry) -> NativeEntry | None:
        """The entry with the next lower σ: the one a sampler reaches next."""
        i = bisect.bisect_left(self._keys, _log_sigma(entry.sigma))
        return self._sorted[i - 1] if i > 0 else None


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

    def finish(self) -> None:
        pass

    def release(self) -> None:
        self._last = None
