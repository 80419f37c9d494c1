"""AM (Eq. 7) against an explicitly materialised M̄ = λ·P_q M_n A + (1 − λ)·M_hires."""

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from fam.attention import (AmContext, am_projected_attention, merge_heads, modulated_attention,
                           pool_keys, split_heads, upsample_queries)


def nearest_matrix(n_out, n_in):
    """(n_out, n_in) 0/1 matrix: output index Y takes input floor(Y · n_in / n_out)."""
    P = torch.zeros(n_out, n_in, dtype=torch.float64)
    for Y in range(n_out):
        P[Y, min(n_in - 1, (Y * n_in) // n_out)] = 1
    return P


def pool_matrix(n_out, n_in):
    """(n_out, n_in) adaptive average pooling: bin k spans [⌊k·n_in/n_out⌋, ⌈(k+1)·n_in/n_out⌉)."""
    A = torch.zeros(n_out, n_in, dtype=torch.float64)
    for k in range(n_out):
        lo, hi = (k * n_in) // n_out, -((-(k + 1) * n_in) // n_out)
        A[k, lo:hi] = 1.0 / (hi - lo)
    return A


def reference(q, k, v, qn, kn, lam, hires_hw, native_hw):
    (H, W), (h, w) = hires_hw, native_hw
    Pq = torch.kron(nearest_matrix(H, h), nearest_matrix(W, w))         # (N, n)
    A = torch.kron(pool_matrix(h, H), pool_matrix(w, W))                # (n, N)
    d = q.shape[-1]
    q, k, v, qn, kn = (t.double() for t in (q, k, v, qn, kn))
    M_hi = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, -1)
    M_n = torch.softmax(qn @ kn.transpose(-1, -2) / d ** 0.5, -1)
    U = Pq @ M_n @ A
    torch.testing.assert_close(U.sum(-1), torch.ones_like(U.sum(-1)))   # rows still sum to 1
    return (lam * U + (1 - lam) * M_hi) @ v


def rand(shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 6), w=st.integers(1, 6), fh=st.sampled_from([1, 2, 3, 1.5, 2.5]),
       fw=st.sampled_from([1, 2, 4, 1.5, 3.25]), lam=st.floats(0, 1), seed=st.integers(0, 999))
def test_matches_materialised_reference(h, w, fh, fw, lam, seed):
    H, W = int(round(h * fh)), int(round(w * fw))
    B, nh, d = 2, 2, 8
    q, k, v = (rand((B, nh, H * W, d), seed + i) for i in range(3))
    qn, kn = (rand((B, nh, h * w, d), seed + 10 + i) for i in range(2))
    out = modulated_attention(q, k, v, qn, kn, lam, (H, W), (h, w))
    torch.testing.assert_close(out.double(), reference(q, k, v, qn, kn, lam, (H, W), (h, w)),
                               atol=2e-5, rtol=1e-5)


def test_integer_fast_path_equals_adaptive_ops():
    v = rand((2, 3, 8 * 12, 5), 0)
    fast = pool_keys(v, (8, 12), (4, 3))
    grid = v.reshape(6, 8, 12, 5).permute(0, 3, 1, 2)
    slow = torch.nn.functional.adaptive_avg_pool2d(grid, (4, 3)).permute(0, 2, 3, 1).reshape(2, 3, 12, 5)
    torch.testing.assert_close(fast, slow)
    x = rand((2, 3, 12, 5), 1)
    up = upsample_queries(x, (4, 3), (8, 12))
    grid = x.reshape(6, 4, 3, 5).permute(0, 3, 1, 2)
    slow = torch.nn.functional.interpolate(grid, size=(8, 12), mode="nearest")
    torch.testing.assert_close(up, slow.permute(0, 2, 3, 1).reshape(2, 3, 96, 5))


def test_am_on_some_rows_leaves_the_others_their_own_attention():
    """Rows whose image has no native map keep plain attention; the others get exactly the AM
    they would get alone."""
    torch.manual_seed(0)
    C, heads, hires, native_hw = 8, 2, (4, 6), (2, 3)
    attn = SimpleNamespace(to_q=torch.nn.Linear(C, C), to_k=torch.nn.Linear(C, C))
    q, k, v = (torch.randn(3, 24, C) for _ in range(3))
    native = torch.randn(2, 6, C)
    with torch.no_grad():
        out = am_projected_attention(q, k, v, heads, attn,
                                     AmContext(native, hires, native_hw, 0.7, rows=(0, 2)))
        alone = am_projected_attention(q[[0, 2]], k[[0, 2]], v[[0, 2]], heads, attn,
                                       AmContext(native, hires, native_hw, 0.7))
        plain = merge_heads(F.scaled_dot_product_attention(
            *(split_heads(t[[1]], heads) for t in (q, k, v))))
    torch.testing.assert_close(out[[0, 2]], alone)
    torch.testing.assert_close(out[[1]], plain)


def test_lambda_limits():
    q, k, v = (rand((1, 2, 64, 8), i) for i in range(3))
    qn, kn = (rand((1, 2, 16, 8), 5 + i) for i in range(2))
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.equal(modulated_attention(q, k, v, qn, kn, 0.0, (8, 8), (4, 4)), plain)
    swapped = modulated_attention(q, k, v, qn, kn, 1.0, (8, 8), (4, 4))
    native = torch.nn.functional.scaled_dot_product_attention(qn, kn, pool_keys(v, (8, 8), (4, 4)))
    torch.testing.assert_close(swapped, upsample_queries(native, (4, 4), (8, 8)), atol=0, rtol=0)


def test_half_precision():
    q, k, v = (rand((1, 2, 64, 8), i).bfloat16() for i in range(3))
    qn, kn = (rand((1, 2, 16, 8), 5 + i).bfloat16() for i in range(2))
    out = modulated_attention(q, k, v, qn, kn, 0.7, (8, 8), (4, 4))
    assert out.dtype == torch.bfloat16
    ref = reference(q, k, v, qn, kn, 0.7, (8, 8), (4, 4))
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=0)


_MEMORY_PROBE = textwrap.dedent("""
    import resource, sys, torch
    from fam.attention import modulated_attention
    torch.set_num_threads(2)
    N, n, d = 16384, 4096, 64
    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    def call(N, n, H, h, mode):
        q, k, v = (torch.randn(1, 1, N, d) for _ in range(3))
        qn, kn = (torch.randn(1, 1, n, d) for _ in range(2))
        if mode == "fam":
            modulated_attention(q, k, v, qn, kn, 0.7, H, h)
        else:   # what an N×N implementation costs: softmax(QKᵀ)V materialised
            torch.softmax(q @ k.transpose(-1, -2), -1) @ v
    mode = sys.argv[1]
    call(256, 64, (16, 16), (8, 8), mode)                     # warm kernels and allocator
    before = peak()
    call(N, n, (128, 128), (64, 64), mode)
    print(peak() - before)
""")


def _peak_growth(mode):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, mode], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


def test_memory_is_linear_in_tokens():
    """N = 16 384 tokens, d = 64: q/k/v/out are 4 MiB each; one N×N map would be 1 GiB.
    The peak RSS growth of a FAM call stays within a small multiple of N·d; the naive
    materialised attention (a control, proving the probe can see N×N) does not."""
    N, d = 16384, 64
    linear_bytes = N * d * 4
    fam = _peak_growth("fam")
    assert fam < 24 * linear_bytes, f"FAM AM call grew peak RSS by {fam / 2**20:.0f} MiB"
    naive = _peak_growth("naive")
    assert naive > N * N * 4 * 0.9, f"probe blind: naive attention grew only {naive / 2**20:.0f} MiB"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hw", [((64, 64), (32, 32)), ((96, 48), (32, 24)), ((48, 48), (32, 32))])
def test_cuda_half_matches_reference_and_stays_linear(hw):
    (H, W), (h, w) = hw
    q, k, v = (rand((2, 4, H * W, 64), i).cuda().half() for i in range(3))
    qn, kn = (rand((2, 4, h * w, 64), 7 + i).cuda().half() for i in range(2))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = modulated_attention(q, k, v, qn, kn, 0.7, (H, W), (h, w))
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 8 * q.numel() * q.element_size()          # O(N·d), never N×N
    ref = reference(q.cpu(), k.cpu(), v.cpu(), qn.cpu(), kn.cpu(), 0.7, (H, W), (h, w))
    torch.testing.assert_close(out.cpu().double(), ref, atol=5e-3, rtol=0)
