"""The two engines the benchmark times, each one generation (native pass + Hires fix at
denoising 1.0, Euler) plain or with FAM, on random weights:

  * `diffusers`: `fam.hosts.diffusers.generate` on a diffusers `UNet2DConditionModel`;
  * `a1111`: the A1111 host itself (CFG-denoiser and inner-model wrappers, `Attn1Hook`, row
    roles) on the ldm-named UNet of `benchmarks.ldm`, driven as A1111 drives it.

Real SD1.5 / SDXL sizes on CUDA (fp16), a small preset with the same block layouts on CPU."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from fam.hosts.a1111 import A1111Generation
from fam.layers import discover
from fam.params import FamParams

from .ldm import CFG, LDM_ARCHS, LDM_CPU, SD_SCHEDULE, LdmConfig, LdmUNet, euler

__all__ = ["ARCHS", "ENGINES", "DiffusersEngine", "A1111Engine", "make_engine"]

# Real architecture configs (diffusers names); native latent size in the last element.
ARCHS = {
    "sd15": (dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  cross_attention_dim=768, attention_head_dim=8), 64),
    "sdxl": (dict(block_out_channels=(320, 640, 1280), layers_per_block=2,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                  cross_attention_dim=2048, use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816), 128),
}
# CPU preset: same layouts, narrow channels, shallow SDXL transformers, small latents.
CPU_PRESET = {
    "sd15": (dict(block_out_channels=(32, 64, 128, 128), cross_attention_dim=64,
                  attention_head_dim=4, norm_num_groups=16), 32),
    "sdxl": (dict(block_out_channels=(32, 64, 128), transformer_layers_per_block=(1, 2, 3),
                  attention_head_dim=(2, 4, 4), cross_attention_dim=64,
                  addition_time_embed_dim=8, projection_class_embeddings_input_dim=64 + 6 * 8,
                  norm_num_groups=16), 32),
}
SCHED = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
ENGINES = ("diffusers", "a1111")


class DiffusersEngine:
    """fam.hosts.diffusers.generate: Euler, CFG batch uncond-then-cond."""

    name = "diffusers"

    def __init__(self, arch: str, device: str):
        from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
        from fam.hosts.diffusers import CfgCond
        config, native = ARCHS[arch]
        config = dict(config)
        if device == "cpu":
            small, native = CPU_PRESET[arch]
            config.update(small)
        dtype = torch.float16 if device == "cuda" else torch.float32
        torch.manual_seed(0)
        with torch.device(device):
            self.unet = UNet2DConditionModel(sample_size=native, **config).eval()
        self.unet.to(dtype)
        g = torch.Generator().manual_seed(0)
        ctx = config["cross_attention_dim"]
        self.cond = CfgCond(torch.randn(2, 77, ctx, generator=g).to(device, dtype))
        if "addition_embed_type" in config:
            text = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
            size = float(native * 8)
            self.cond.added = {"text_embeds": torch.randn(2, text, generator=g).to(device, dtype),
                               "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2,
                                                        device=device, dtype=dtype)}
        self.sched = EulerDiscreteScheduler(**SCHED)
        self.native = native

    def run(self, scale: int, steps: int, params: FamParams | None):
        from fam.hosts.diffusers import generate
        n = self.native
        result = generate(self.unet, self.sched, self.cond, native_hw=(n, n),
                          hires_hw=(n * scale, n * scale), steps=steps,
                          params=params or FamParams())
        return result.run


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
        self.schedule = SD_SCHEDULE
        self.layout = discover(self.unet)
        g = torch.Generator().manual_seed(0)

        def context():
            return torch.randn(77, cfg.context_dim, generator=g).to(device, dtype)
        self.cond = SimpleNamespace(batch=[[context()] for _ in range(batch)])
        self.uncond = context().expand(batch, -1, -1)
        self.vector = (torch.randn(1, cfg.adm_dim, generator=g).to(device, dtype)
                       if cfg.adm_dim else None)

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

        sigmas = self.sigmas(steps)
        gen = A1111Generation(params, self.layout, self.schedule, "bench") if params else None
        p = SimpleNamespace(sd_model=SimpleNamespace(model=SimpleNamespace(diffusion_model=self.unet)))

        def sampler():   # a new one per pass, as A1111's
            return SimpleNamespace(func=euler, model_wrap_cfg=CFG(self.unet, vector=self.vector))

        def sample(s, x):
            return euler(s.model_wrap_cfg, x, sigmas, self.cond, self.uncond, scale=7.0)
        try:
            with torch.inference_mode():
                if gen:
                    gen.install()
                first = sampler()
                if gen:
                    gen.record_native(p, first, vp=False)
                native = sample(first, noise(n) * sigmas[0])
                z0 = F.interpolate(native.float(), size=(n * scale,) * 2, mode="bicubic",
                                   align_corners=False).to(self.dtype)
                eps = noise(n * scale)
                hires = sampler()
                if gen:
                    gen.guide_hires(p, hires, z0, eps, vp=False)
                sample(hires, z0 + eps * sigmas[0])
            return gen.run if gen else None
        finally:
            if gen:
                gen.remove()


def make_engine(name: str, arch: str, device: str):
    return A1111Engine(arch, device) if name == "a1111" else DiffusersEngine(arch, device)
