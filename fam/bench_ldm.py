"""The A1111 engine of the benchmark: a UNet with ldm/sgm module names and structure, driven
the way AUTOMATIC1111 drives it, with FAM through the A1111 host (fam.hosts.a1111).

The UNet has the module tree of ldm's `openaimodel.UNetModel` (`input_blocks`, `middle_block`,
`output_blocks`, `SpatialTransformer` at index 1 of a block, `transformer_blocks.N.attn1`), so
layer discovery and `Attn1Hook` see what they see in the WebUI; its attention forward is the
fused SDPA one A1111 installs by default. The sampler stack is A1111's: a CFG denoiser that
builds the cond-then-uncond batch and combines the outputs, around a k-diffusion `CompVis`
denoiser (σ → t, input scaling) around the UNet, stepped by Euler on the model's discrete
σ schedule. Random weights: the cost does not depend on them."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from .hosts.a1111 import A1111Generation
from .layers import discover
from .params import FamParams
from .schedule import VPSchedule

__all__ = ["LdmConfig", "LDM_ARCHS", "LdmUNet", "A1111Engine"]


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
# the CPU preset: the same layouts as fam.bench's diffusers CPU preset
LDM_CPU = {
    "sd15": replace(LDM_ARCHS["sd15"], channels=32, heads=(4,) * 4, context_dim=64, groups=16,
                    native=32),
    "sdxl": replace(LDM_ARCHS["sdxl"], channels=32, depth=(0, 2, 3), heads=(2, 4, 4),
                    middle_depth=3, context_dim=64, adm_dim=112, groups=16, native=32),
}


# ---- the UNet ------------------------------------------------------------------------
class CrossAttention(nn.Module):
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

    def forward(self, x, context):
        x = self.attn1(self.norm1(x)) + x
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

    def forward(self, x, context):
        b, c, h, w = x.shape
        t = self.norm(x)
        if not self.linear:
            t = self.proj_in(t)
        t = t.flatten(2).transpose(1, 2)
        if self.linear:
            t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t, context)
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
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class LdmUNet(nn.Module):
    """forward(x, timesteps, context, y=None) -> eps, as ldm's UNetModel."""

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

    def forward(self, x, timesteps, context, y=None):
        emb = self.time_embed(timestep_embedding(timesteps, self.cfg.channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)


# ---- A1111's sampler stack -------------------------------------------------------------
class CompVisDenoiser(nn.Module):
    """k-diffusion's discrete-schedule ε denoiser: D(x, σ) = x − σ·ε(x/√(σ²+1), t(σ))."""

    def __init__(self, unet: LdmUNet, schedule: VPSchedule):
        super().__init__()
        self.unet = unet
        self.log_sigmas = schedule.log_sigmas.float()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Log-σ interpolation on device, without a host round trip (as k-diffusion)."""
        ls = self.log_sigmas.to(sigma.device)
        x = sigma.float().log()
        low = (x[:, None] >= ls[None]).sum(1).clamp(1, len(ls) - 1) - 1
        frac = ((x - ls[low]) / (ls[low + 1] - ls[low])).clamp(0, 1)
        return low + frac

    def forward(self, x, sigma, cond):
        c_in = (sigma ** 2 + 1) ** -0.5
        eps = self.unet(x * c_in[:, None, None, None].to(x.dtype), self.sigma_to_t(sigma),
                        torch.cat(cond["c_crossattn"]), cond.get("c_adm"))
        return x - sigma[:, None, None, None].to(x.dtype) * eps


class CFGDenoiser(nn.Module):
    """A1111's CFG denoiser: per image its cond rows (one per AND part), then the uncond rows,
    in one inner-model call; the outputs combined with the CFG scale."""

    def __init__(self, denoiser: CompVisDenoiser):
        super().__init__()
        self.model_wrap = denoiser

    @property
    def inner_model(self):
        return self.model_wrap

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond=0.0, image_cond=None):
        parts = cond.batch
        x_in = torch.cat([x[i:i + 1].expand(len(p), -1, -1, -1) for i, p in enumerate(parts)] + [x])
        s_in = torch.cat([sigma[i:i + 1].expand(len(p)) for i, p in enumerate(parts)] + [sigma])
        ctx = torch.cat([p.context for ps in parts for p in ps] + [uncond.context])
        c = {"c_crossattn": [ctx]}
        if uncond.adm is not None:
            c["c_adm"] = torch.cat([p.adm for ps in parts for p in ps] + [uncond.adm])
        out = self.inner_model(x_in, s_in, cond=c)
        B = x.shape[0]
        denoised, at = out[-B:].clone(), 0
        for i, ps in enumerate(parts):
            for _ in ps:
                denoised[i] += (out[at] - out[-B + i]) * (cond_scale / len(ps))
                at += 1
        return denoised


def sample_euler(model, x, sigmas, extra):
    """k-diffusion's Euler: one denoiser call per step, σ on the device."""
    s_in = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra)
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


# ---- the engine -----------------------------------------------------------------------
class A1111Engine:
    """Native pass + Hires fix (latent, bicubic, denoising 1.0) as A1111 runs them, plain or
    with FAM through `A1111Generation` (installed for one generation, removed in `finally`)."""

    name = "a1111"

    def __init__(self, arch: str, device: str, batch: int = 1, cfg: LdmConfig | None = None):
        cfg = cfg or (LDM_CPU if device == "cpu" else LDM_ARCHS)[arch]
        dtype = torch.float16 if device == "cuda" else torch.float32
        self.device, self.dtype, self.native = device, dtype, cfg.native
        torch.manual_seed(0)
        with torch.device(device):
            self.unet = LdmUNet(cfg).eval()
        self.unet.to(dtype)
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.schedule = VPSchedule(torch.cumprod(1 - betas, 0))
        self.layout = discover(self.unet)
        g = torch.Generator().manual_seed(0)

        def prompt():
            adm = torch.randn(1, cfg.adm_dim, generator=g) if cfg.adm_dim else None
            return SimpleNamespace(
                context=torch.randn(1, 77, cfg.context_dim, generator=g).to(device, dtype),
                adm=None if adm is None else adm.to(device, dtype))
        self.cond = SimpleNamespace(batch=[[prompt()] for _ in range(batch)])
        self.uncond = prompt()
        if batch > 1:
            self.uncond = SimpleNamespace(**{k: None if v is None else v.expand(batch, *v.shape[1:])
                                             for k, v in vars(self.uncond).items()})

    def sigmas(self, steps: int) -> torch.Tensor:
        """The model's discrete schedule: t evenly spaced from T−1 to 0, then σ = 0."""
        ts = torch.linspace(self.schedule.num_train_timesteps - 1, 0, steps)
        s = [self.schedule.t_to_sigma(float(t)) for t in ts] + [0.0]
        return torch.tensor(s, dtype=torch.float32, device=self.device)

    def run(self, scale: int, steps: int, params: FamParams | None, seed: int = 0):
        """One generation; returns its FamRun (None when plain)."""
        g = torch.Generator().manual_seed(seed)
        B, n = len(self.cond.batch), self.native

        def noise(size):
            return torch.randn(B, 4, size, size, generator=g).to(self.device, self.dtype)

        extra = dict(uncond=self.uncond, cond=self.cond, cond_scale=7.0)
        sigmas = self.sigmas(steps)
        gen = A1111Generation(params, self.layout, self.schedule, "bench") if params else None
        p = SimpleNamespace(sd_model=SimpleNamespace(model=SimpleNamespace(diffusion_model=self.unet)))

        def sampler():   # a new one per pass, as A1111's
            return SimpleNamespace(func=sample_euler,
                                   model_wrap_cfg=CFGDenoiser(CompVisDenoiser(self.unet, self.schedule)))
        try:
            with torch.inference_mode():
                if gen:
                    gen.install()
                first = sampler()
                if gen:
                    gen.record_native(p, first, vp=False)
                native = sample_euler(first.model_wrap_cfg, noise(n) * sigmas[0], sigmas, extra)
                z0 = F.interpolate(native.float(), size=(n * scale,) * 2, mode="bicubic",
                                   align_corners=False).to(self.dtype)
                eps = noise(n * scale)
                hires = sampler()
                if gen:
                    gen.guide_hires(p, hires, z0, eps, vp=False)
                sample_euler(hires.model_wrap_cfg, z0 + eps * sigmas[0], sigmas, extra)
            return gen.run if gen else None
        finally:
            if gen:
                gen.remove()
