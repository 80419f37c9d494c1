"""FamRun and NativeRecord directly: roles not row indices, σ matching, budget, skips."""

import math

import pytest
import torch

import diffusers
from conftest import SCHED_KW
from fam.guidance import FamRun, token_grid
from fam.layers import AttnLayer
from fam.params import FamParams
from fam.record import NativeRecord, Role, Segment
from fam.schedule import VPSchedule

U0, C0, U1, C1 = Role(0, True), Role(0), Role(1, True), Role(1)


@pytest.fixture
def run():
    layer = AttnLayer("L", torch.nn.Identity(), "output", 3, 0, 1, 2)
    schedule = VPSchedule(diffusers.DDPMScheduler(**SCHED_KW).alphas_cumprod)
    return FamRun(FamParams(enabled=True), [layer], schedule)


def hidden(rows, tokens, seed):
    return torch.randn(rows, tokens, 8, generator=torch.Generator().manual_seed(seed))


def test_token_grid_uses_ceil_halving():
    assert token_grid((13, 10), 0) == (13, 10)
    assert token_grid((13, 10), 2) == (4, 3)


def test_roles_not_row_indices_and_nearest_sigma(run):
    run.begin_native()
    native = {}
    for sigma in (10.0, 1.0, 0.1):
        run.begin_call(sigma, [U0, U1, C0, C1], (8, 8))
        native[sigma] = hidden(4, 16, int(sigma * 10))
        assert run.on_attn1("L", native[sigma]) is None
    run.begin_hires(torch.zeros(2, 4, 16, 16), torch.zeros(2, 4, 16, 16))
    run.begin_call(0.8, [C1, C0], (16, 16))            # split call, other row order
    ctx = run.on_attn1("L", hidden(2, 64, 7))
    assert ctx.hires_hw == (8, 8) and ctx.native_hw == (4, 4) and ctx.lam == 0.7
    assert torch.equal(ctx.native_hidden, native[1.0][[3, 2]])
    run.begin_call(math.exp((math.log(10) + math.log(1)) / 2) * 1.01, [U1], (16, 16))
    assert torch.equal(run.on_attn1("L", hidden(1, 64, 8)).native_hidden, native[10.0][[1]])
    assert run.am_calls == 2 and run.report() == {}


def test_and_parts_fall_back_to_the_first_cond(run):
    run.begin_native()
    run.begin_call(1.0, [C0, U0], (8, 8))
    h = hidden(2, 16, 1)
    run.on_attn1("L", h)
    run.begin_hires(torch.zeros(1, 4, 16, 16), torch.zeros(1, 4, 16, 16))
    run.begin_call(1.0, [C0, Role(0, False, 1), U0], (16, 16))
    assert torch.equal(run.on_attn1("L", hidden(3, 64, 2)).native_hidden, h[[0, 0, 1]])


def test_impossible_calls_are_skipped_counted_and_reported(run):
    run.begin_native()
    run.begin_call(1.0, [C0, U0], (8, 8))
    run.on_attn1("L", hidden(2, 16, 1))
    run.begin_hires(torch.zeros(1, 4, 16, 16), torch.zeros(1, 4, 16, 16))
    run.begin_call(1.0, [C0, U0], (16, 16))
    assert run.on_attn1("L", hidden(2, 32, 2)) is None        # merged tokens
    assert run.on_attn1("L", hidden(8, 16, 3)) is None        # hypertile: rows × tiles
    assert run.on_attn1("L", hidden(2, 64, 4)) is not None
    run.begin_call(1.0, [Role(5)], (16, 16))
    assert run.on_attn1("L", hidden(1, 64, 5)) is None        # role never recorded
    assert run.am_calls == 1 and sum(run.am_skipped.values()) == 3
    text = run.report()["FAM AM skipped"]
    assert text.startswith("3 of 4 calls") and "token grid changed" in text
    assert "no native map for the call's rows" in text


def test_a_role_the_first_pass_never_ran_borrows_and_no_row_waits_for_another(run):
    run.begin_native()
    run.begin_call(1.0, [C0, C1], (8, 8))          # CFG 1: cond rows only
    h0 = hidden(2, 16, 1)
    run.on_attn1("L", h0)
    run.begin_call(0.5, [C0, U0], (8, 8))          # image 1 not in this call at all
    h1 = hidden(2, 16, 2)
    run.on_attn1("L", h1)
    run.begin_hires(torch.zeros(2, 4, 16, 16), torch.zeros(2, 4, 16, 16))
    run.begin_call(1.0, [C0, C1, U0, U1], (16, 16))
    ctx = run.on_attn1("L", hidden(4, 64, 3))
    assert ctx.rows is None and torch.equal(ctx.native_hidden, h0[[0, 1, 0, 1]])
    run.begin_call(0.5, [C0, C1, U0, U1], (16, 16))
    ctx = run.on_attn1("L", hidden(4, 64, 4))
    assert ctx.rows == (0, 2) and torch.equal(ctx.native_hidden, h1)
    assert run.am_calls == 2 and not run.am_skipped
    assert run.report()["FAM AM fallback"] == (
        "1 of 2 calls: rows of a CFG branch the first pass did not run took their image's other "
        "branch's map; 1 of 2 calls: rows whose image has no native map kept their own attention")


def test_nothing_is_recorded_when_am_is_off(run):
    run.params = run.params.replace(am_enabled=False)
    run.begin_native()
    run.begin_call(1.0, [C0], (8, 8), replay="payload")
    assert run.on_attn1("L", hidden(1, 16, 1)) is None
    assert run.record.map_bytes == 0 and run.record.entry(1.0).replays == []


def test_record_budget_is_honoured_and_switches_to_recompute():
    row_bytes = 16 * 8 * 4
    rec = NativeRecord(budget_bytes=5 * row_bytes)
    seen = []
    for i, sigma in enumerate((3.0, 2.0, 1.0)):
        e = rec.entry(sigma)
        e.replays.append(i)
        seg = rec.open(e, Segment.plan([C0, U0], {"L": (2, 16, 8)}, torch.float32),
                       torch.device("cpu"))
        if seg is not None:
            assert seg.write("L", hidden(2, 16, i))
        seen.append(rec.map_bytes)
        assert rec.map_bytes <= rec.budget_bytes == 5 * row_bytes
        assert rec.memory.allocated_bytes == rec.map_bytes     # bytes allocated = counted
    assert seen == [2 * row_bytes, 4 * row_bytes, 0] and rec.recompute
    assert rec.memory.buffers == 0
    assert all(not rec.entry(s).segments for s in (3.0, 2.0, 1.0))
    assert [rec.entry(s).replays for s in (3.0, 2.0, 1.0)] == [[0], [1], [2]]
    assert rec.nearest(1.6).sigma == 2.0 and rec.nearest(1.3).sigma == 1.0
    assert rec.nearest(100).sigma == 3.0 and rec.sigmas == [1.0, 2.0, 3.0]
