"""Page-locked record buffers against a fake CUDA runtime that answers as the real one does:
every buffer is registered with its exact size on its own pages, from the worker thread;
every failure (refused, no bindings, no runtime, a failing unregister) leaves a usable pageable
buffer and no exception; every registration is undone by `release()` or, at the latest, when
the last view of the buffer dies — never left behind."""

import gc
import threading
import time
import weakref

import pytest
import torch

import diffusers
import fam.transfer
from conftest import SCHED_KW, cfg_cond, tiny_sdxl
from fam.guidance import FamRun
from fam.hosts.diffusers import generate
from fam.params import FamParams
from fam.record import NativeRecord
from fam.schedule import VPSchedule
from fam.transfer import HostMemory, page_locked

ON = FamParams(enabled=True)
PAGE = 4096
NOT_REGISTERED = 712       # cudaErrorHostMemoryNotRegistered
OUT_OF_MEMORY = 2          # cudaErrorMemoryAllocation


class FakeCudart:
    """cudaHostRegister / cudaHostUnregister with the runtime's answers, and a log."""

    def __init__(self, refuse=lambda size: False, raises=False, unregister_fails=False):
        self.refuse, self.raises, self.unregister_fails = refuse, raises, unregister_fails
        self.live: dict[int, int] = {}                 # address -> bytes registered
        self.log: list[tuple[str, int, str]] = []      # (call, address, thread)

    def cudaHostRegister(self, ptr, size, flags):
        self.log.append(("register", ptr, threading.current_thread().name))
        if self.raises:
            raise AttributeError("cudaHostRegister")
        if self.refuse(size):
            return OUT_OF_MEMORY
        assert flags == 1 and ptr % PAGE == 0 and ptr not in self.live
        self.live[ptr] = size
        return 0

    def cudaHostUnregister(self, ptr):
        self.log.append(("unregister", ptr, threading.current_thread().name))
        if ptr not in self.live:
            return NOT_REGISTERED
        if self.unregister_fails:                      # e.g. the runtime is being torn down
            return OUT_OF_MEMORY
        del self.live[ptr]
        return 0

    def calls(self, name):
        return [entry for entry in self.log if entry[0] == name]


def test_a_page_locked_buffer_is_exact_on_pages_of_its_own_and_unlocks_once():
    rt = FakeCudart()
    a, pa = page_locked(1000, torch.float16, rt)
    b, pb = page_locked(3, torch.float32, rt)
    assert (a.numel(), a.nbytes, b.nbytes) == (1000, 2000, 12)
    assert rt.live == {a.data_ptr(): 2000, b.data_ptr(): 12}
    a.fill_(1)
    assert float(a.sum()) == 1000
    assert pa.unlock() and pa.unlock() and rt.live == {b.data_ptr(): 12}
    assert len(rt.calls("unregister")) == 1


def test_the_last_view_dying_unregisters_before_the_pages_are_unmapped():
    rt = FakeCudart()
    t, pages = page_locked(256, torch.float32, rt)
    view, gone = t[8:], weakref.ref(pages)
    del t, pages
    gc.collect()
    assert gone() is not None and len(rt.live) == 1      # a view keeps pages and registration
    view.fill_(2)
    del view
    assert gone() is None and rt.live == {}             # unregistered by __del__, then unmapped


@pytest.mark.parametrize("case", ["refused", "no binding", "no runtime"])
def test_a_buffer_that_cannot_be_page_locked_is_pageable_usable_and_reported(case, monkeypatch):
    rt = {"refused": FakeCudart(refuse=lambda size: True), "no binding": FakeCudart(raises=True),
          "no runtime": None}[case]
    monkeypatch.setattr(fam.transfer, "cuda_runtime", lambda: None)   # as on a CPU build
    mem = HostMemory(pin=True, runtime=rt)
    buf = mem.allocate(10, torch.float32)
    buf.copy_(torch.arange(10.0))
    assert float(buf.sum()) == 45 and mem.pin_failed
    assert mem.allocated_bytes == buf.nbytes == 40
    mem.release()
    assert mem.allocated_bytes == 0
    assert rt is None or rt.calls("unregister") == []      # nothing registered, nothing undone
    run = FamRun(ON, [], VPSchedule(diffusers.DDPMScheduler(**SCHED_KW).alphas_cumprod))
    run.memory = mem
    assert "cudaHostRegister failed" in run.report()["FAM record"]


def test_an_empty_buffer_is_not_a_failure():
    rt = FakeCudart()
    mem = HostMemory(pin=True, runtime=rt)
    assert mem.allocate(0, torch.float16).numel() == 0
    assert not mem.pin_failed and rt.log == []


def test_release_unregisters_everything_on_the_worker_even_when_the_runtime_refuses():
    """The worker's initializer cannot set a CUDA device here (CPU build): the worker still
    runs; registration and unregistration both happen on it; a refusing unregister raises
    nothing."""
    rt = FakeCudart(unregister_fails=True)
    mem = HostMemory(pin=True, device=torch.device("cuda", 0), runtime=rt)
    bufs = [mem.request(n, torch.float16).result() for n in (1, 100, 3000, 1 << 16)]
    assert len(rt.live) == 4 and not mem.pin_failed
    assert mem.allocated_bytes == mem.peak_bytes == sum(b.nbytes for b in bufs)
    registered = {ptr for _, ptr, _ in rt.calls("register")}
    mem.release()
    assert mem.allocated_bytes == mem.buffers == 0
    assert {ptr for _, ptr, _ in rt.calls("unregister")} == registered
    assert {thread for _, _, thread in rt.log} == {"fam-record_0"}
    del bufs
    assert len(rt.calls("unregister")) == 4                # tried once: not again at __del__


def test_release_frees_a_buffer_whose_allocation_is_still_queued():
    rt = FakeCudart()
    slow = rt.cudaHostRegister

    def register(*a):
        time.sleep(0.05)
        return slow(*a)

    rt.cudaHostRegister = register
    mem = HostMemory(pin=True, runtime=rt)
    pending = [mem.request(1024, torch.float32) for _ in range(3)]
    mem.release()
    assert all(f.done() for f in pending) and rt.live == {} and mem.allocated_bytes == 0


# ---- a whole offloaded generation with page-locking, on CPU ---------------------------
@pytest.fixture
def pinned_offload(monkeypatch):
    """The offloaded record as on CUDA (staging, worker, prefetch), its host buffers
    page-locked through the fake runtime."""
    rt = FakeCudart()
    monkeypatch.setattr(NativeRecord, "offload_devices", ("cuda", "cpu"))
    real = NativeRecord._start

    def start(self, device):
        real(self, device)
        self.memory.pin, self.memory.runtime = True, rt

    monkeypatch.setattr(NativeRecord, "_start", start)
    return rt


@pytest.fixture(scope="module")
def unet():
    return tiny_sdxl()


def run(unet, sched=None, **kw):
    return generate(unet, sched or diffusers.EulerDiscreteScheduler(**SCHED_KW), cfg_cond("sdxl"),
                    native_hw=(16, 16), hires_hw=(32, 32), steps=4, params=ON, **kw)


def test_a_page_locked_offloaded_generation_equals_the_device_record_and_unlocks_all(
        unet, pinned_offload, monkeypatch):
    rt = pinned_offload
    sizes = []
    real = FamRun.begin_hires

    def begin_hires(self, *a, **k):
        real(self, *a, **k)
        sizes.extend(rt.live.values())

    monkeypatch.setattr(FamRun, "begin_hires", begin_hires)
    off = run(unet)
    assert sum(sizes) == off.run.stats["record_bytes"] > 0 and len(sizes) == 4
    assert rt.live == {} and not off.run.memory.pin_failed and "FAM record" not in off.run.report()
    assert {thread for _, _, thread in rt.log} == {"fam-record_0"}
    monkeypatch.setattr(NativeRecord, "offload_devices", ("cuda",))
    assert torch.equal(off.hires, run(unet).hires)


def test_page_locking_stays_under_half_the_free_ram_and_says_so(unet, pinned_offload, monkeypatch):
    """Page-locked memory cannot be swapped: a record larger than half the RAM free at its
    start page-locks up to that, keeps the rest pageable (same result) and says so."""
    rt = pinned_offload
    registered = []
    register = rt.cudaHostRegister

    def counting(ptr, size, flags):
        registered.append(size)
        return register(ptr, size, flags)

    rt.cudaHostRegister = counting
    whole = run(unet)
    segment = whole.run.stats["record_bytes"] // 4            # one per native step, equal
    assert registered == [segment] * 4 and "FAM record" not in whole.run.report()
    registered.clear()
    monkeypatch.setattr(fam.transfer, "available_ram", lambda: 5 * segment)   # half: 2.5 segments
    capped = run(unet)
    assert registered == [segment] * 2 and rt.live == {}
    assert capped.run.memory.unpinned_bytes == 2 * segment and not capped.run.memory.pin_failed
    assert capped.run.report()["FAM record"].startswith(
        f"{2 * segment / 2**20:.1f} MiB pageable (page-locked memory kept under half the RAM")
    assert torch.equal(capped.hires, whole.hires)


def test_the_free_ram_is_known_here_and_a_container_limit_bounds_it(tmp_path):
    ram = fam.transfer.available_ram()
    assert ram is not None and 0 < ram < 2**50
    (tmp_path / "memory.max").write_text("3000000\n")            # cgroup v2: 3 MB, 1 MB used
    (tmp_path / "memory.current").write_text("1000000\n")
    assert fam.transfer.available_ram(str(tmp_path)) == min(ram, 2000000) == 2000000
    (tmp_path / "memory.max").write_text("max\n")
    assert fam.transfer.available_ram(str(tmp_path)) >= 0.5 * ram   # no limit: the machine's


def test_a_failing_generation_leaves_no_registration(unet, pinned_offload, monkeypatch):
    sched = diffusers.EulerDiscreteScheduler(**SCHED_KW)
    real_step, calls = type(sched).step, []

    def failing_step(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:          # inside the native pass, buffers still being made
            raise RuntimeError("boom")
        return real_step(self, *a, **k)

    monkeypatch.setattr(type(sched), "step", failing_step)
    with pytest.raises(RuntimeError, match="boom"):
        run(unet, sched=sched)
    assert pinned_offload.calls("register") and pinned_offload.live == {}
