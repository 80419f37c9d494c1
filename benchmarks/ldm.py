"""Stand-ins, from our own small classes, for what FAM meets in the WebUIs: a UNet with the
module names and structure of ldm's `openaimodel.UNetModel` (`input_blocks`, `middle_block`,
`output_blocks`, `SpatialTransformer` at index 1 of a block, `transformer_blocks.N.attn1`),
so layer discovery and FAM's hooks see what they see in A1111 and Forge, and A1111's sampler
stack around it: k-diffusion's discrete-schedule denoiser, the CFG denoiser, Euler.

The benchmark's A1111 engine runs them at real SD1.5/SDXL sizes; the tests' miniature
WebUIs (tests/a1111_like.py, tests/forge_like.py) run them at a few thousand parameters.
Random weights: what FAM does does not depend on them."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fam.schedule import VPSchedule

__all__ = ["LdmConfig", "LDM_ARCHS", "LDM_CPU", "SD_BETAS", "SD_SCHEDULE", "LdmUNet", "CrossAttention",
           "BasicTransformerBlock", "Denoiser", "CFG", "euler"]


@dataclass(frozen=True)
class LdmConfig:
    channels: int = 320
    mult: tuple[int, ...] = (1, 2, 4, 4)
    depth: tuple[int, ...] = (1, 1, 1, 0)     # transformer blocks per level (0: no attention)
    heads: tuple[int, ...] = (8, 8, 8, 8)
    middle_depth: int = 1
    context_dim: int = 768
    adm_dim: int = 0                          # SDXL's pooled-text + size vector
    linear: bool = False                      # SpatialTransformer projections: Linear or 1×1 conv
    groups: int = 32
    native: int = 64                          # native latent size


LDM_ARCHS = {
    "sd15": LdmConfig(),
    "sdxl": LdmConfig(mult=(1, 2, 4), depth=(0, 2, 10), heads=(5, 10, 20), middle_depth=10,
                      context_dim=2048, adm_dim=2816, linear=True, native=128),
}
# the benchmark's CPU preset: the same layouts as its diffusers CPU preset
LDM_CPU = {
    "sd15": replace(LDM_ARCHS["sd15"], channels=32, heads=(4,) * 4, context_dim=64, groups=16,
                    native=32),
    "sdxl": replace(LDM_ARCHS["sdxl"], channels=32, depth=(0, 2, 3), heads=(2, 4, 4),
                    middle_depth=3, context_dim=64, adm_dim=112, groups=16, native=32),
}
# SD's scaled-linear noise schedule
SD_BETAS = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
SD_SCHEDULE = VPSchedule(torch.cumprod(1 - SD_BETAS, 0))


# ---- the UNet ------------------------------------------------------------------------
class CrossAttention(nn.Module):
    """ldm's attention module with the fused SDPA forward A1111 installs by default."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None, mask=None):
        ctx = x if context is None else context
        b, n, c = x.shape
        q, k, v = (p(t).view(b, -1, self.heads, c // self.heads).transpose(1, 2)
                   for p, t in ((self.to_q, x), (self.to_k, ctx), (self.to_v, ctx)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(out.transpose(1, 2).reshape(b, n, c))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, context_dim)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))

    def self_attention(self, x, transformer_options=None):
        return self.attn1(self.norm1(x))

    def forward(self, x, context, transformer_options=None):
        x = self.self_attention(x, transformer_options) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, ch: int, heads: int, depth: int, cfg: LdmConfig):
        super().__init__()
        self.linear = cfg.linear
        self.norm = nn.GroupNorm(cfg.groups, ch, eps=1e-6)
        proj = (lambda: nn.Linear(ch, ch)) if cfg.linear else (lambda: nn.Conv2d(ch, ch, 1))
        self.proj_in = proj()
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(ch, heads, cfg.context_dim) for _ in range(depth))
        self.proj_out = proj()

    def forward(self, x, context, transformer_options=None):
        b, c, h, w = x.shape
        t = self.norm(x)
        if not self.linear:
            t = self.proj_in(t)
        t = t.flatten(2).transpose(1, 2)
        if self.linear:
            t = self.proj_in(t)
        for i, block in enumerate(self.transformer_blocks):
            if transformer_options is not None:
                transformer_options["block_index"] = i
            t = block(t, context, transformer_options)
        if self.linear:
            t = self.proj_out(t)
        t = t.transpose(1, 2).reshape(b, c, h, w)
        if not self.linear:
            t = self.proj_out(t)
        return t + x


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, cin), nn.SiLU(),
                                       nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, cout), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Nearest ×2, or to the skip connection's size (odd latent sizes), then a conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size=None):
        x = F.interpolate(x, size=size, mode="nearest") if size is not None else \
            F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context, size=None, transformer_options=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, transformer_options)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class LdmUNet(nn.Module):
    """forward(x, timesteps, context, y=None) -> ε, as ldm's UNetModel; `y` (SDXL's vector)
    is used when the config has `adm_dim`. `transformer_options`: the dict Forge's UNet
    carries through its blocks, with the keys it sets (`block`, `block_index`)."""

    def __init__(self, cfg: LdmConfig):
        super().__init__()
        self.cfg = cfg
        mc, emb = cfg.channels, 4 * cfg.channels
        self.time_embed = nn.Sequential(nn.Linear(mc, emb), nn.SiLU(), nn.Linear(emb, emb))
        if cfg.adm_dim:
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(cfg.adm_dim, emb), nn.SiLU(), nn.Linear(emb, emb)))
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(4, mc, 3, padding=1))])
        skips, ch = [mc], mc
        last = len(cfg.mult) - 1
        for level, m in enumerate(cfg.mult):
            for _ in range(2):
                layers = [ResBlock(ch, m * mc, emb, cfg.groups)]
                ch = m * mc
                if cfg.depth[level]:
                    layers.append(SpatialTransformer(ch, cfg.heads[level], cfg.depth[level], cfg))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skips.append(ch)
            if level != last:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skips.append(ch)
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ch, emb, cfg.groups),
            SpatialTransformer(ch, cfg.heads[last], cfg.middle_depth, cfg),
            ResBlock(ch, ch, emb, cfg.groups))
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(cfg.mult))):
            for i in range(3):
                layers = [ResBlock(ch + skips.pop(), cfg.mult[level] * mc, emb, cfg.groups)]
                ch = cfg.mult[level] * mc
                if cfg.depth[level]:
                    layers.append(SpatialTransformer(ch, cfg.heads[level], cfg.depth[level], cfg))
                if level and i == 2:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(cfg.groups, ch), nn.SiLU(),
                                 nn.Conv2d(mc, 4, 3, padding=1))

    def forward(self, x, timesteps, context, y=None, transformer_options=None):
        opts = transformer_options
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.channels).to(x.dtype))
        if y is not None and self.cfg.adm_dim:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for i, block in enumerate(self.input_blocks):
            if opts is not None:
                opts["block"] = ("input", i)
            h = block(h, emb, context, transformer_options=opts)
            hs.append(h)
        if opts is not None:
            opts["block"] = ("middle", 0)
        h = self.middle_block(h, emb, context, transformer_options=opts)
        for i, block in enumerate(self.output_blocks):
            if opts is not None:
                opts["block"] = ("output", i)
            h = torch.cat([h, hs.pop()], dim=1)
            h = block(h, emb, context, hs[-1].shape[-2:] if hs else None, transformer_options=opts)
        return self.out(h)


# ---- A1111's sampler stack -------------------------------------------------------------
def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Log-σ interpolation on the device, without a host round trip (as k-diffusion)."""
    ls = log_sigmas.to(sigma.device)
    x = sigma.float().log()
    low = (x[:, None] >= ls[None]).sum(1).clamp(1, len(ls) - 1) - 1
    frac = ((x - ls[low]) / (ls[low + 1] - ls[low])).clamp(0, 1)
    return low + frac


class Denoiser(nn.Module):
    """k-diffusion's discrete-schedule ε denoiser (`CompVisDenoiser`): σ in, x₀ out,
    D(x, σ) = x − σ·ε(x/√(σ²+1), t(σ)); or, with `vp`, the timestep denoiser of DDIM/UniPC:
    t and a VP latent in, ε out. `cond`: {"c_crossattn": [context], "vector": y (SDXL)}.
    `log`, when a list, gets (latent hw, cond) of every call."""

    def __init__(self, unet: nn.Module, vp: bool = False, schedule: VPSchedule = SD_SCHEDULE,
                 log: list | None = None):
        super().__init__()
        self.unet, self.vp, self.log = unet, vp, log
        self.log_sigmas = schedule.log_sigmas.float()

    def forward(self, x, sigma, cond):
        if self.log is not None:
            self.log.append((tuple(x.shape[-2:]), cond))
        context, y = cond["c_crossattn"][0], cond.get("vector")
        if self.vp:
            return self.unet(x, sigma, context, y)
        c_in = (sigma ** 2 + 1) ** -0.5
        eps = self.unet(x * c_in[:, None, None, None].to(x.dtype), sigma_to_t(sigma, self.log_sigmas),
                        context, y)
        return x - sigma[:, None, None, None].to(x.dtype) * eps


class CFG(nn.Module):
    """A1111's CFG denoiser: per image its cond rows (one per AND part: `cond.batch[i]` lists
    image i's contexts), then the uncond rows, in one inner-model call, in chunks of `split`
    rows, or without the uncond rows (`skip_uncond`: every step, or the steps it holds);
    the outputs combined with the CFG scale. `vector` (SDXL's size conditioning) rides along
    in the cond dict; `refiner_at` swaps the inner model for `refiner`'s before that call, as
    A1111's refiner switch does; `log` is handed to the denoiser."""

    def __init__(self, unet, vp=False, split=None, skip_uncond=False, vector=None,
                 refiner_at=None, refiner=None, log=None):
        super().__init__()
        self.model_wrap = Denoiser(unet, vp, log=log)
        self.split, self.skip_uncond, self.vector = split, skip_uncond, vector
        self.refiner_at, self.refiner = refiner_at, refiner
        self.calls, self.rows_seen = 0, []

    @property
    def inner_model(self):
        return self.model_wrap

    def _cond(self, c, a, b):
        cond = {"c_crossattn": [c[a:b]]}
        if self.vector is not None:
            cond["vector"] = self.vector.expand(c.shape[0], -1)[a:b]
        return cond

    def _skips_uncond(self) -> bool:
        skip = self.skip_uncond
        return skip if isinstance(skip, bool) else self.calls in skip

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond=0.0, image_cond=None):
        if self.calls == self.refiner_at:
            self.model_wrap = Denoiser(self.refiner, self.model_wrap.vp, log=self.model_wrap.log)
        skip = self._skips_uncond()
        self.calls += 1
        parts = cond.batch
        B = len(parts)
        x_in = torch.cat([x[i:i + 1].expand(len(p), -1, -1, -1) for i, p in enumerate(parts)] + [x])
        s_in = torch.cat([sigma[i:i + 1].expand(len(p)) for i, p in enumerate(parts)] + [sigma])
        c_in = torch.cat([torch.stack(p) for p in parts] + [uncond])
        n = x_in.shape[0] - (B if skip else 0)
        step = self.split or n
        out = torch.cat([self.inner_model(x_in[a:min(a + step, n)], s_in[a:min(a + step, n)],
                                          cond=self._cond(c_in, a, min(a + step, n)))
                         for a in range(0, n, step)])
        self.rows_seen.append(out.shape[0])
        den, at = [], 0
        for i, p in enumerate(parts):
            cond_out = out[at:at + len(p)].mean(0)
            den.append(cond_out if skip else out[-B + i] + cond_scale * (cond_out - out[-B + i]))
            at += len(p)
        return torch.stack(den)


def euler(cfg: Callable, x, sigmas, cond, uncond, scale=5.0, callback=None):
    """k-diffusion's Euler: one denoiser call per step, σ on the device."""
    s_in = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        den = cfg(x, sigmas[i] * s_in, uncond=uncond, cond=cond, cond_scale=scale)
        if callback is not None:
            callback({"x": x, "i": i, "denoised": den})
        x = x + (x - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x
