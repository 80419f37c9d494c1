"""Moving the offloaded native record between host and device off the critical path.

Copies run on one side stream, ordered against the compute stream by events only (no host
synchronisation): the side stream waits for the event after the last write or use of what it
overwrites, and the compute stream waits for the event after the copy it reads. Tensors used on
the side stream are marked with `record_stream`, so the caching allocator never hands their
memory out while a copy is still running. On a device without streams (CPU) every copy happens
at once and events are None, so the same code runs, in the same order, in the CPU tests.
Host buffers are page-locked with cudaHostRegister on pages of their own (`page_locked`), so
those copies are asynchronous; any failure leaves a pageable buffer, never an exception."""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import torch

if TYPE_CHECKING:
    from .record import NativeEntry

__all__ = ["Streams", "Prefetcher", "Pages", "page_locked", "cuda_runtime"]

_ALIGN = 256   # bytes: every segment in a slot starts aligned for any dtype view
_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context


class Streams:
    """The compute stream (the current one at each call) and the record's side stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def mark(self) -> Any:
        """Event after everything queued so far on the compute stream."""
        if self.side is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def copy(self, pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], after: Any = None) -> Any:
        """dst.copy_(src) for each pair on the side stream once `after` has happened; returns
        the event that marks the copies done."""
        if self.side is None:
            for dst, src in pairs:
                dst.copy_(src)
            return None
        with torch.cuda.stream(self.side):
            if after is not None:
                self.side.wait_event(after)
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
                for t in (dst, src):
                    if t.is_cuda:
                        t.record_stream(self.side)
            done = torch.cuda.Event()
            done.record(self.side)
        return done

    def wait(self, event: Any) -> None:
        """Make the compute stream wait for `event` (no host synchronisation)."""
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def synchronize(self) -> None:
        if self.side is not None:
            self.side.synchronize()


class _Slot:
    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self.entry: NativeEntry | None = None
        self.flats: tuple[torch.Tensor, ...] = ()
        self.ready: Any = None     # side stream: the entry's copy is complete
        self.free: Any = None      # compute stream: the last read of the previous entry


class Prefetcher:
    """The offloaded record on the device during the high-res pass, in two reusable slots:
    the current call's σ-entry in one, the entry a sampler reaches next (next lower σ) copied
    into the other while the current step computes. Any other order (a restart sampler, a
    partial-strength start) loads the entry on demand, still stream-ordered and exact."""

    def __init__(self, entries: Sequence[NativeEntry], upcoming: Callable[[NativeEntry], NativeEntry | None],
                 streams: Streams, device: torch.device):
        self.upcoming, self.streams, self.device = upcoming, streams, device
        self.size = max((sum(_aligned(s.nbytes) for s in e.segments) for e in entries), default=0)
        self._slots = (_Slot(), _Slot())
        self._cur = 0
        self.prefetched = self.loaded = 0   # entries used after a prefetch / loaded on demand

    def flats(self, entry: NativeEntry) -> tuple[torch.Tensor, ...]:
        """The entry's segments on the device (one flat buffer each), for this call."""
        cur, other = self._slots[self._cur], self._slots[1 - self._cur]
        if cur.entry is entry:
            return cur.flats
        if other.entry is entry:
            self.prefetched += 1
        else:
            self._load(other, entry)
            self.loaded += 1
        cur.free = self.streams.mark()
        self.streams.wait(other.ready)
        self._cur = 1 - self._cur
        upcoming = self.upcoming(entry)
        if upcoming is not None and upcoming is not cur.entry:
            self._load(cur, upcoming)
        return other.flats

    def _load(self, slot: _Slot, entry: NativeEntry) -> None:
        if slot.buffer is None:
            slot.buffer = torch.empty(self.size, dtype=torch.uint8, device=self.device)
        flats, pairs, at = [], [], 0
        for seg in entry.segments:
            flat = slot.buffer[at:at + seg.nbytes].view(seg.dtype)
            flats.append(flat)
            pairs.append((flat, seg.host))
            at += _aligned(seg.nbytes)
        slot.ready = self.streams.copy(pairs, after=slot.free)
        slot.entry, slot.flats = entry, tuple(flats)


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


# ---- page-locked host buffers ------------------------------------------------------------
def cuda_runtime() -> Any:
    """PyTorch's bindings of the CUDA runtime (cudaHostRegister, cudaHostUnregister), or None
    where there are none (a CPU build raises AssertionError, a broken driver RuntimeError)."""
    try:
        return torch.cuda.cudart()
    except Exception:
        return None


class Pages(mmap.mmap):
    """Anonymous memory on pages of its own (page-locking it touches no page of another
    allocation, which a second cudaHostRegister of that page would refuse). While `runtime`
    is set the pages are registered with it; they are unregistered by `unlock()` or, at the
    latest, when the last tensor on them dies — before mmap unmaps them."""

    runtime: Any = None
    address = 0

    def unlock(self) -> bool:
        """Unregister (once); False if the runtime refused. Never raises: it also runs
        from `__del__`, at any time, on any thread."""
        runtime, self.runtime = self.runtime, None
        if runtime is None:
            return True
        try:
            return int(runtime.cudaHostUnregister(self.address)) == 0
        except Exception:
            return False

    def __del__(self):
        self.unlock()


def page_locked(numel: int, dtype: torch.dtype, runtime: Any) -> tuple[torch.Tensor, Pages | None]:
    """A host buffer of exactly `numel` elements, page-locked through `runtime` when it can be
    (its `Pages` returned with it), else pageable (None): still correct, its copies are
    synchronous. A failed cudaHostRegister leaves the runtime's last-error state on the
    calling thread: call this on a thread that launches no kernels."""
    if runtime is None or numel == 0:
        return torch.empty(numel, dtype=dtype), None
    pages = Pages(-1, numel * dtype.itemsize)
    t = torch.frombuffer(pages, dtype=dtype, count=numel)   # holds `pages` while it lives
    try:
        ok = int(runtime.cudaHostRegister(t.data_ptr(), t.nbytes, _PORTABLE)) == 0
    except Exception:   # bindings without it, a driver error: stay pageable
        ok = False
    if not ok:
        return t, None
    pages.runtime, pages.address = runtime, t.data_ptr()
    return t, pages
