"""Host/device movement of the native record: host buffers and the copies between them.

`HostMemory` allocates the record's host buffers exactly, page-locked when they feed a CUDA
device (`page_locked`: cudaHostRegister on pages of their own) and gives every byte back;
`Streams` copies on a side stream ordered by events only (no host synchronisation), and
`Prefetcher` brings the next σ-entry to the device while the current step computes. On a
device without streams (CPU) every copy happens at once, so the CPU tests run the same code
in the same order. Page-locked memory cannot be swapped: what one record locks is kept under
a share of the RAM free when it starts (`pin_limit`); past it, and on any failure to
page-lock, a buffer stays pageable (its copies are synchronous), never an exception."""

from __future__ import annotations

import mmap
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Protocol, Sequence

import torch

__all__ = ["Streams", "Prefetcher", "HostMemory", "Pages", "page_locked", "cuda_runtime",
           "available_ram", "pin_limit", "PIN_SHARE"]

_ALIGN = 256   # bytes: every segment in a slot starts aligned for any dtype view
_PORTABLE = 1  # cudaHostRegisterPortable: page-locked for every CUDA context
PIN_SHARE = 0.5   # what one record may page-lock: this share of the RAM free at its start


class Entry(Protocol):
    """What the prefetcher reads of a record entry (`fam.record.NativeEntry`): its segments,
    each with `nbytes`, `dtype` and its host buffer `host`."""
    segments: Sequence[Any]


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
        self.entry: Entry | None = None
        self.flats: tuple[torch.Tensor, ...] = ()
        self.ready: Any = None     # side stream: the entry's copy is complete
        self.free: Any = None      # compute stream: the last read of the previous entry


class Prefetcher:
    """The offloaded record on the device during the high-res pass, in two reusable slots:
    the current call's σ-entry in one, the entry a sampler reaches next (next lower σ) copied
    into the other while the current step computes. Any other order (a restart sampler, a
    partial-strength start) loads the entry on demand, still stream-ordered and exact."""

    def __init__(self, entries: Sequence[Entry], upcoming: Callable[[Entry], Entry | None],
                 streams: Streams, device: torch.device):
        self.upcoming, self.streams, self.device = upcoming, streams, device
        self.size = max((sum(_aligned(s.nbytes) for s in e.segments) for e in entries), default=0)
        self._slots = (_Slot(), _Slot())
        self._cur = 0
        self.prefetched = self.loaded = 0   # entries used after a prefetch / loaded on demand

    def flats(self, entry: Entry) -> tuple[torch.Tensor, ...]:
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

    def _load(self, slot: _Slot, entry: Entry) -> None:
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


_CGROUP_FILES = (("memory.max", "memory.current"),                        # cgroup v2
                 ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"))   # v1


def available_ram(cgroup: str = "/sys/fs/cgroup") -> int | None:
    """Bytes of RAM the OS can hand out now without swapping (Linux: MemAvailable, and no more
    than the container's memory limit leaves; Windows: the available physical memory;
    elsewhere the free pages), None where it does not say."""
    if sys.platform.startswith("linux"):
        ram = None
        try:
            with open("/proc/meminfo") as f:
                ram = next((int(line.split()[1]) * 1024 for line in f
                            if line.startswith("MemAvailable:")), None)
        except (OSError, ValueError, IndexError):
            pass
        room = _cgroup_room(cgroup)
        return room if ram is None else ram if room is None else min(ram, room)
    if sys.platform == "win32":
        import ctypes

        class MemoryStatus(ctypes.Structure):
            _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong),
                        ("total", ctypes.c_ulonglong), ("available", ctypes.c_ulonglong),
                        ("total_page", ctypes.c_ulonglong), ("available_page", ctypes.c_ulonglong),
                        ("total_virtual", ctypes.c_ulonglong),
                        ("available_virtual", ctypes.c_ulonglong),
                        ("available_extended", ctypes.c_ulonglong)]

        status = MemoryStatus(length=ctypes.sizeof(MemoryStatus))
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
            return int(status.available)
        return None
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _cgroup_room(root: str) -> int | None:
    """What a container's memory limit leaves (limit − usage), None without a limit."""
    for limit_file, usage_file in _CGROUP_FILES:
        try:
            with open(os.path.join(root, limit_file)) as f:
                limit = f.read().strip()
            with open(os.path.join(root, usage_file)) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:   # v1 writes "no limit" as a huge number
            return None
        return max(int(limit) - usage, 0)
    return None


def pin_limit() -> int | None:
    """Bytes one record may page-lock: `PIN_SHARE` of the RAM available now (None: unknown)."""
    ram = available_ram()
    return None if ram is None else int(PIN_SHARE * ram)


class HostMemory:
    """Every host buffer of one record: exactly the size asked for (no power-of-two rounding,
    unlike PyTorch's caching host allocator; page-locked buffers are whole pages of their own,
    < 4 KiB more), page-locked when it feeds a CUDA device (`pin`) and while the page-locked
    total stays within `pin_limit`, counted, and all given back by `release()`. `request`
    allocates on a worker thread (page-locking costs time in proportion to the size) while
    the UNet runs. A buffer left pageable by the limit counts in `unpinned_bytes`; one whose
    page-locking failed sets `pin_failed` (both noted in the infotext); nothing here raises
    for either. `runtime`: the CUDA runtime bindings (`cuda_runtime()` when first needed)."""

    def __init__(self, pin: bool = False, device: torch.device | None = None, runtime: Any = None,
                 pin_limit: int | None = None):
        self.pin, self.device, self.runtime = pin, device, runtime
        self.pin_limit = pin_limit
        self.allocated_bytes = self.peak_bytes = self.buffers = 0
        self.pinned_bytes = self.unpinned_bytes = 0
        self.pin_failed = False
        self._live: list[tuple[torch.Tensor, Pages | None]] = []
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    def _may_pin(self, nbytes: int) -> bool:
        """Count `nbytes` as page-locked if the limit allows it."""
        with self._lock:
            if self.pin_limit is not None and self.pinned_bytes + nbytes > self.pin_limit:
                self.unpinned_bytes += nbytes
                return False
            self.pinned_bytes += nbytes
            return True

    def allocate(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        pages = None
        pin = self.pin and numel > 0 and self._may_pin(numel * dtype.itemsize)
        if pin:
            if self.runtime is None:
                self.runtime = cuda_runtime()
            t, pages = page_locked(numel, dtype, self.runtime)
        else:
            t = torch.empty(numel, dtype=dtype)
        with self._lock:
            if pin and pages is None:
                self.pin_failed = True
                self.pinned_bytes -= t.nbytes
            self._live.append((t, pages))
            self.allocated_bytes += t.nbytes
            self.peak_bytes = max(self.peak_bytes, self.allocated_bytes)
            self.buffers += 1
        return t

    def request(self, numel: int, dtype: torch.dtype) -> Future:
        """`allocate` on the worker thread, where a failed cudaHostRegister also leaves its
        error state (per thread), away from the thread that launches kernels."""
        if self._pool is None:
            init = (lambda: _use_device(self.device)) if self.pin else None
            self._pool = ThreadPoolExecutor(1, "fam-record", initializer=init)
        return self._pool.submit(self.allocate, numel, dtype)

    def release(self) -> None:
        """Free everything (after the copies that use it are complete: the caller syncs).
        With a worker, it runs there after every allocation still queued, so a buffer that
        arrives late is freed too, and a failed unregistration leaves its error state there.
        The pages are unmapped as soon as no tensor views them any more."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.submit(self._free)
            pool.shutdown(wait=True)
        self._free()   # nothing left when the worker did it

    def _free(self) -> None:
        with self._lock:
            live, self._live = self._live, []
            self.allocated_bytes = self.buffers = self.pinned_bytes = 0
        for _, pages in live:
            if pages is not None:
                pages.unlock()


def _use_device(device: torch.device | None) -> None:
    """The worker's current device: the record's (registration is portable, so any context
    would do; a device that cannot be set leaves the default one)."""
    try:
        torch.cuda.set_device(device)
    except Exception:
        pass
