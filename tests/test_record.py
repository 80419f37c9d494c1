"""The record's fast paths against the obvious ones: views instead of stacked rows, exact host
buffers (bytes allocated = bytes counted, nothing left after the generation), and the
offloaded record's prefetch order (the entry used at step k is the one for step k's σ), run
on CPU through the same code as on CUDA (`offload_devices` + "cpu"); CUDA-only checks of the
stream synchronisation and the page-locked memory at the end."""

import math
import threading
import time

import pytest
import torch

import diffusers
from conftest import SCHED_KW, cfg_cond, tiny_sdxl
from fam.guidance import FamRun
from fam.hosts.diffusers import generate
from fam.layers import AttnLayer
from fam.params import FamParams
from fam.record import NativeRecord, Role
from fam.schedule import VPSchedule
from fam.transfer import HostMemory, Prefetcher, Streams

ON = FamParams(enabled=True)
NATIVE, HIRES = (16, 16), (32, 32)
U0, C0, U1, C1 = Role(0, True), Role(0), Role(1, True), Role(1)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def offload_on_cpu(monkeypatch):
    """Run the offloaded path (staging, host buffers on a worker thread, prefetch slots) on
    CPU: the copies are immediate there, the order and the bookkeeping are the same."""
    monkeypatch.setattr(NativeRecord, "offload_devices", ("cuda", "cpu"))


@pytest.fixture
def spy(monkeypatch):
    """Log (σ of each high-res call, σ of the entry its maps came from) and keep the record."""
    seen = {"calls": [], "record": None}
    real = FamRun._ready_maps

    def ready_maps(self, sigma, roles):
        maps, runs = real(self, sigma, roles)
        seen["record"] = self.record
        seen["calls"].append((sigma, None if maps is None else maps.entry.sigma))
        return maps, runs

    monkeypatch.setattr(FamRun, "_ready_maps", ready_maps)
    return seen


def run(unet, sched=None, params=ON, batch=1, **kw):
    sched = sched or diffusers.EulerDiscreteScheduler(**SCHED_KW)
    return generate(unet, sched, cfg_cond("sdxl", batch), native_hw=NATIVE, hires_hw=HIRES,
                    steps=4, params=params, **kw)


# ---- rows come out of the record as views ----------------------------------------------
def rand(rows, tokens, seed):
    return torch.randn(rows, tokens, 8, generator=torch.Generator().manual_seed(seed))


def make_run():
    module = torch.nn.Module()
    module.to_q = torch.nn.Linear(8, 8)
    layer = AttnLayer("L", module, "output", 3, 0, 1, 2)
    schedule = VPSchedule(diffusers.DDPMScheduler(**SCHED_KW).alphas_cumprod)
    return FamRun(ON, [layer], schedule)


def test_rows_are_views_of_the_record_when_the_call_has_the_native_layout():
    r = make_run()
    r.begin_native()
    r.begin_call(1.0, [C0, C1, U0, U1], (8, 8))
    h = rand(4, 16, 0)
    r.on_attn1("L", h)
    C2, U2 = Role(2), Role(2, True)
    r.begin_call(1.0, [C2, U2], (8, 8))                  # the rest of a split batch, same σ
    h2 = rand(2, 16, 1)
    r.on_attn1("L", h2)
    r.begin_hires(torch.zeros(3, 4, 16, 16), torch.zeros(3, 4, 16, 16))
    cases = [([C0, C1, U0, U1], h, True), ([U0, U1], h[2:], True), ([C2, U2], h2, True),
             ([C1, C0], h[[1, 0]], False), ([Role(0, False, 1), U1], h[[0, 3]], False),
             ([C2, U0], torch.cat([h2[:1], h[2:3]]), False)]
    for roles, expect, view in cases:
        r.begin_call(1.0, roles, (16, 16))
        ctx = r.on_attn1("L", rand(len(roles), 64, 9))
        assert torch.equal(ctx.native_hidden, expect)
        shares = {f.untyped_storage().data_ptr() for f in r._maps.flats}
        assert (ctx.native_hidden.untyped_storage().data_ptr() in shares) == view, roles
    seg_bytes = (4 + 2) * 16 * 8 * 4
    assert r.record.map_bytes == r.memory.allocated_bytes == seg_bytes
    r.end()
    assert r.memory.allocated_bytes == 0 and r.memory.buffers == 0
    assert r.memory.peak_bytes == seg_bytes


# ---- exact host memory -----------------------------------------------------------------
@pytest.fixture(scope="module")
def unet():
    return tiny_sdxl()


def record_bytes(unet, rows, calls):
    from fam.layers import discover
    layers = discover(unet).am_layers()
    tokens = (NATIVE[0] // 4) * (NATIVE[1] // 4)          # SDXL first up-block: 2 halvings
    return calls * sum(rows * tokens * l.module.to_q.in_features * 4 for l in layers)


@pytest.mark.parametrize("offload", [False, True], ids=["on-device", "offloaded"])
def test_host_bytes_allocated_equal_bytes_counted_and_are_all_given_back(unet, monkeypatch, offload):
    if offload:
        monkeypatch.setattr(NativeRecord, "offload_devices", ("cuda", "cpu"))
    at_hires = {}
    real = FamRun.begin_hires

    def begin_hires(self, *a, **k):
        real(self, *a, **k)
        at_hires.update(counted=self.record.map_bytes, allocated=self.memory.allocated_bytes,
                        buffers=self.memory.buffers)

    monkeypatch.setattr(FamRun, "begin_hires", begin_hires)
    r = run(unet, batch=2)
    expect = record_bytes(unet, rows=4, calls=4)
    assert at_hires == dict(counted=expect, allocated=expect, buffers=4)   # one per native call
    assert r.run.stats["record_bytes"] == r.run.memory.peak_bytes == expect
    assert r.run.memory.allocated_bytes == 0 and r.run.memory.buffers == 0


def test_memory_is_given_back_when_the_pass_raises(unet, offload_on_cpu, monkeypatch):
    memories = []
    real = FamRun.begin_native

    def begin_native(self):
        real(self)
        memories.append(self.memory)

    monkeypatch.setattr(FamRun, "begin_native", begin_native)
    sched = diffusers.EulerDiscreteScheduler(**SCHED_KW)
    real_step, calls = type(sched).step, []

    def failing_step(self, *a, **k):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("boom")
        return real_step(self, *a, **k)

    monkeypatch.setattr(type(sched), "step", failing_step)
    with pytest.raises(RuntimeError, match="boom"):
        run(unet, sched=sched)
    assert memories[0].peak_bytes > 0 and memories[0].allocated_bytes == 0


def test_budget_counts_exact_bytes(unet):
    one_call = record_bytes(unet, rows=2, calls=1)
    fits = run(unet, params=ON.replace(record_budget_mb=1))
    assert 4 * one_call <= 2**20 and fits.run.stats["record_bytes"] == 4 * one_call


# ---- the offloaded record and its prefetch ---------------------------------------------
SAMPLERS = {
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "heun (2nd order)": (diffusers.HeunDiscreteScheduler, {}),
    "euler, hires 2x longer": (diffusers.EulerDiscreteScheduler, {"hires_steps": 8}),
    "heun, hires 3x longer": (diffusers.HeunDiscreteScheduler, {"hires_steps": 12}),
    "dpm++ 2m, half strength": (diffusers.DPMSolverMultistepScheduler,
                                {"denoising_strength": 0.5}),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_prefetch_uses_the_entry_of_each_steps_sigma(unet, offload_on_cpu, spy, monkeypatch, name):
    cls, kw = SAMPLERS[name]
    params = ON if "strength" not in name else ON.replace(full_renoise=False)
    off = run(unet, cls(**SCHED_KW), params=params, **kw)
    record = spy["record"]
    assert off.run.stats["loaded"] == 1                 # only the first entry waits for its copy
    entries = sorted(record.sigmas)
    for sigma, used in spy["calls"]:
        expect = min(entries, key=lambda s: abs(math.log(s) - math.log(sigma)))
        assert used == expect, (sigma, used, expect)
    distinct = len(dict.fromkeys(used for _, used in spy["calls"]))
    assert off.run.stats["prefetched"] == distinct - 1
    monkeypatch.setattr(NativeRecord, "offload_devices", ("cuda",))   # the same run, in place
    ref = run(unet, cls(**SCHED_KW), params=params, **kw)
    assert torch.equal(off.hires, ref.hires) and off.run.am_calls == ref.run.am_calls > 0


def test_slow_host_allocation_stages_on_the_device_and_loses_nothing(unet, offload_on_cpu, monkeypatch):
    real = HostMemory.allocate
    threads = set()

    def slow(self, numel, dtype):
        threads.add(threading.current_thread().name)
        time.sleep(0.05)
        return real(self, numel, dtype)

    monkeypatch.setattr(HostMemory, "allocate", slow)
    off = run(unet, batch=2)
    assert threads and all(t.startswith("fam-record") for t in threads)
    monkeypatch.setattr(NativeRecord, "offload_devices", ("cuda",))
    monkeypatch.setattr(HostMemory, "allocate", real)
    assert torch.equal(off.hires, run(unet, batch=2).hires)


def test_prefetcher_order_restart_and_repeat():
    """Entries σ = 4, 3, 2, 1; visit 4 4 3 2 4 (restart up) 1: copies land in the slot that
    is read, prefetch follows the visit, a jump loads on demand."""
    from fam.record import NativeEntry, Segment
    entries = []
    for i, sigma in enumerate((1.0, 2.0, 3.0, 4.0)):
        seg = Segment.plan([C0], {"L": (1, 2, 3)}, torch.float32)
        seg.host = torch.full((seg.numel,), sigma)
        seg.recorded.add("L")
        entries.append(NativeEntry(sigma, [seg]))
    below = {e.sigma: (entries[i - 1] if i else None) for i, e in enumerate(entries)}
    p = Prefetcher(entries, lambda e: below[e.sigma], Streams(torch.device("cpu")), torch.device("cpu"))
    by = {e.sigma: e for e in entries}
    for sigma in (4.0, 4.0, 3.0, 2.0, 4.0, 1.0):
        flats = p.flats(by[sigma])
        assert torch.equal(flats[0], torch.full((6,), sigma))
    assert (p.loaded, p.prefetched) == (3, 2)   # 4 (first), 4 (restart), 1 (after the jump)


# ---- CUDA only: streams, page-locked memory --------------------------------------------
@CUDA
def test_cuda_offloaded_prefetch_equals_device_record_under_a_slow_compute_stream(monkeypatch):
    """A compute stream kept busy (torch.cuda._sleep before each UNet call) makes a missing
    event wait show up as wrong maps; the result must equal the on-device record bit for bit,
    with every host byte page-locked by us, none from PyTorch's caching host allocator, and
    none left afterwards."""
    unet = tiny_sdxl().cuda()
    cond = cfg_cond("sdxl")
    cond.states = cond.states.cuda()
    cond.added = {k: v.cuda() for k, v in cond.added.items()}
    real = FamRun.begin_call

    def busy_begin_call(self, *a, **k):
        torch.cuda._sleep(2_000_000)
        return real(self, *a, **k)

    monkeypatch.setattr(FamRun, "begin_call", busy_begin_call)
    stats = getattr(torch.cuda, "host_memory_stats", lambda: {})
    out = {}
    for offload in (False, True):
        before = stats().get("allocated_bytes.current", 0)
        r = generate(unet, diffusers.EulerDiscreteScheduler(**SCHED_KW), cond, native_hw=NATIVE,
                     hires_hw=HIRES, steps=4, params=ON.replace(record_offload=offload))
        out[offload] = r
        assert stats().get("allocated_bytes.current", 0) == before
    off = out[True].run
    assert off.memory.pin and not off.memory.pin_failed and off.stats["loaded"] == 1
    assert off.memory.peak_bytes == off.stats["record_bytes"] > 0
    assert off.memory.allocated_bytes == 0
    assert torch.equal(out[True].hires, out[False].hires)


@CUDA
def test_cuda_side_stream_copy_waits_for_the_compute_stream():
    streams = Streams(torch.device("cuda"))
    src = torch.zeros(1 << 20, device="cuda")
    torch.cuda._sleep(5_000_000)
    src.fill_(7.0)                                   # queued behind the sleep
    host = torch.empty(src.shape, pin_memory=True)
    done = streams.copy([(host, src)], after=streams.mark())
    done.synchronize()
    assert bool((host == 7.0).all())


@CUDA
def test_cuda_small_neighbouring_buffers_all_pin_and_unpin():
    mem = HostMemory(pin=True, device=torch.device("cuda", torch.cuda.current_device()))
    bufs = [mem.request(n, torch.float16).result() for n in (1, 100, 3000, 1 << 20)]
    assert all(b.is_pinned() for b in bufs) and not mem.pin_failed
    assert mem.allocated_bytes == mem.peak_bytes == sum(b.nbytes for b in bufs)
    mem.release()
    assert mem.allocated_bytes == 0 and mem.buffers == 0
    assert not any(b.is_pinned() for b in bufs)      # unregistered; mapped while viewed
