"""Attention Modulation (FAM Eq. 7) without ever forming an attention map.

M̄·V = λ·U(M_native)·V + (1 − λ)·M_hires·V, and with U = nearest upsampling on the query
grid and average pooling on the key grid (docs/method.md §3):

    U(M_native)·V = NearestUp_query( softmax(Q_n K_nᵀ·scale) · AvgPool_key(V) )

so both terms are fused `scaled_dot_product_attention` calls: memory O(N·d)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["AmContext", "am_self_attention", "am_projected_attention", "modulated_attention", "pool_keys", "upsample_queries", "split_heads", "merge_heads"]


def _factors(hires_hw, native_hw):
    """Integer per-axis factors (sh, sw), or None when an axis is not an exact multiple."""
    (H, W), (h, w) = hires_hw, native_hw
    if H % h or W % w:
        return None
    return H // h, W // w


def pool_keys(v: torch.Tensor, hires_hw, native_hw) -> torch.Tensor:
    """(B, heads, H·W, d) -> (B, heads, h·w, d): adaptive average pooling over the key grid.
    Pooled in the (B, H, W, heads·d) layout a projection gives (a view when `v` came from
    `split_heads`), seen as a channels-last image: one pooling kernel, no layout copies."""
    B, nh, N, d = v.shape
    (H, W), (h, w) = hires_hw, native_hw
    grid = v.transpose(1, 2).reshape(B, H, W, nh * d).permute(0, 3, 1, 2)
    f = _factors(hires_hw, native_hw)
    if f is not None:
        pooled = F.avg_pool2d(grid, f)              # exact bins for integer factors
    else:
        pooled = F.adaptive_avg_pool2d(grid, (h, w))
    return pooled.permute(0, 2, 3, 1).reshape(B, h * w, nh, d).transpose(1, 2)


def upsample_queries(x: torch.Tensor, native_hw, hires_hw) -> torch.Tensor:
    """(B, heads, h·w, d) -> (B, heads, H·W, d): nearest upsampling over the query grid
    (source index floor(Y·h/H), in exact integer arithmetic)."""
    B, nh, n, d = x.shape
    (h, w), (H, W) = native_hw, hires_hw
    f = _factors(hires_hw, native_hw)
    if f is not None:
        sh, sw = f
        grid = x.reshape(B, nh, h, 1, w, 1, d).expand(B, nh, h, sh, w, sw, d)
        return grid.reshape(B, nh, H * W, d)
    return x.index_select(2, _nearest_index(native_hw, hires_hw, x.device))


@functools.lru_cache(maxsize=8)
def _nearest_index(native_hw, hires_hw, device) -> torch.Tensor:
    """Flat native token of every high-res token under nearest upsampling."""
    (h, w), (H, W) = native_hw, hires_hw
    iy = torch.arange(H, device=device) * h // H
    ix = torch.arange(W, device=device) * w // W
    return (iy[:, None] * w + ix[None, :]).flatten()


def modulated_attention(q, k, v, q_native, k_native, lam: float, hires_hw, native_hw,
                        scale=None) -> torch.Tensor:
    """FAM Eq. 7 via the pooled-V identity. q, k, v: (B, heads, N, d) with N = H·W;
    q_native, k_native: (B, heads, n, d) with n = h·w. Returns (B, heads, N, d)."""
    hires = F.scaled_dot_product_attention(q, k, v, scale=scale)
    if lam == 0:
        return hires
    v_pooled = pool_keys(v, hires_hw, native_hw)
    native = F.scaled_dot_product_attention(q_native, k_native, v_pooled, scale=scale)
    f = _factors(hires_hw, native_hw)
    if f is None:
        return hires.lerp_(upsample_queries(native, native_hw, hires_hw), lam)
    # integer factors: blend through a broadcast view, the upsampled term is never formed
    B, nh, _, d = hires.shape
    (H, W), (h, w), (sh, sw) = hires_hw, native_hw, f
    blended = hires.view(B, nh, h, sh, w, sw, d)
    blended.lerp_(native.view(B, nh, h, 1, w, 1, d), lam)
    return hires


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads·d) -> (B, heads, N, d)."""
    B, N, C = x.shape
    return x.view(B, N, heads, C // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N, heads·d)."""
    B, nh, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, nh * d)


class AmContext(NamedTuple):
    """What an AM layer call needs from the native pass: its normalised attn1 input for the
    same row roles (rows, n, C), the token grids, and λ. `rows`: the call's rows those are
    for, when not all of them have a native map (the others keep their own attention)."""
    native_hidden: torch.Tensor
    hires_hw: tuple[int, int]
    native_hw: tuple[int, int]
    lam: float
    rows: tuple[int, ...] | None = None


def am_self_attention(attn: torch.nn.Module, hidden: torch.Tensor, ctx: AmContext) -> torch.Tensor:
    """A self-attention layer's forward with AM, for modules exposing `heads`, `to_q`, `to_k`,
    `to_v` and `to_out` (ldm/sgm CrossAttention, diffusers Attention). Q_n, K_n come from the
    layer's own projections, so LoRA patches on them stay active."""
    q, k, v = (proj(hidden) for proj in (attn.to_q, attn.to_k, attn.to_v))
    out = am_projected_attention(q, k, v, attn.heads, attn, ctx)
    for layer in attn.to_out:
        out = layer(out)
    return out


def am_projected_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                           attn: torch.nn.Module, ctx: AmContext) -> torch.Tensor:
    """AM for hosts that hand over q, k, v already projected, (rows, N, heads·d) each (Forge's
    attn1 replace): returns the attention output of that shape, before `to_out`. Q_n, K_n
    come from `attn.to_q` / `attn.to_k` on the native input."""
    native, scale = ctx.native_hidden, getattr(attn, "scale", None)
    q_n, k_n = (split_heads(proj(native), heads) for proj in (attn.to_q, attn.to_k))
    q, k, v = (split_heads(t, heads) for t in (q, k, v))
    if ctx.rows is None:
        out = modulated_attention(q, k, v, q_n, k_n, ctx.lam, ctx.hires_hw, ctx.native_hw,
                                  scale=scale)
    else:
        rows = list(ctx.rows)
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        out[rows] = modulated_attention(q[rows], k[rows], v[rows], q_n, k_n, ctx.lam,
                                        ctx.hires_hw, ctx.native_hw, scale=scale)
    return merge_heads(out.to(q.dtype))
