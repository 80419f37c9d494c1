"""diffusers host: FAM on a `UNet2DConditionModel` driven by diffusers schedulers.

The reference engine for the tests and the benchmark: a native pass that records, then a FAM
high-res pass from latents. Works with σ-space schedulers (Euler, Euler ancestral, Heun, LMS)
and VP ones (DDIM, DPM++ 2M = DPMSolverMultistep, UniPC)."""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ..attention import am_self_attention
from ..guidance import FamRun
from ..layers import AttnLayer, discover
from ..params import FamParams
from ..record import Role
from ..schedule import VPSchedule, noised_reference

__all__ = ["FamAttnProcessor", "fam_processors", "CfgCond", "FamResult", "generate",
           "upsample_latent", "cfg_roles", "Progress"]


class FamAttnProcessor:
    """attn1 processor: hands self-attention calls to the run (record or modulate) and every
    other call, or a call the run declines, to the layer's original processor."""

    def __init__(self, run: FamRun, name: str, original):
        self.run, self.name, self.original = run, name, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, *args, **kwargs):
        if encoder_hidden_states is None and attention_mask is None and hidden_states.ndim == 3:
            ctx = self.run.on_attn1(self.name, hidden_states)
            if ctx is not None:
                return am_self_attention(attn, hidden_states, ctx)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                             *args, **kwargs)


def _check_plain(layer: AttnLayer) -> None:
    m = layer.module
    if (getattr(m, "residual_connection", False) or getattr(m, "rescale_output_factor", 1.0) != 1.0
            or getattr(m, "norm_q", None) is not None or getattr(m, "group_norm", None) is not None):
        raise ValueError(f"FAM: {layer.name} is not a plain self-attention layer")


@contextmanager
def fam_processors(run: FamRun, layers: Sequence[AttnLayer]) -> Iterator[None]:
    """Install FAM processors on `layers` for one generation; always restores the originals."""
    originals: list[tuple[torch.nn.Module, object]] = []
    try:
        for layer in layers:
            _check_plain(layer)
            current = layer.module.processor
            if isinstance(current, FamAttnProcessor):
                raise RuntimeError(f"FAM is already installed on {layer.name}")
            originals.append((layer.module, current))
            layer.module.set_processor(FamAttnProcessor(run, layer.name, current))
        yield
    finally:
        for module, proc in reversed(originals):
            module.set_processor(proc)


@dataclass
class CfgCond:
    """CFG conditioning in the diffusers batch layout: B uncond rows, then B cond rows."""
    states: torch.Tensor                      # (2B, L, D) encoder hidden states
    added: dict | None = None                 # SDXL: {"text_embeds", "time_ids"}, 2B rows each

    @property
    def batch(self) -> int:
        return self.states.shape[0] // 2

    def cond_rows(self) -> "CfgCond":
        """The cond half alone: what a UNet call needs when guidance is 1."""
        b = self.batch
        added = None if self.added is None else {k: v[b:] for k, v in self.added.items()}
        return CfgCond(self.states[b:], added)


def cfg_roles(batch: int) -> list[Role]:
    return [Role(i, uncond=True) for i in range(batch)] + [Role(i) for i in range(batch)]


def upsample_latent(z: torch.Tensor, hw) -> torch.Tensor:
    """z̃₀ = U(z⁰_native): bicubic, one jump to the target latent size (docs/method.md §1 step 2)."""
    return F.interpolate(z.float(), size=tuple(hw), mode="bicubic", align_corners=False).to(z.dtype)


def _is_vp(scheduler) -> bool:
    return float(scheduler.init_noise_sigma) <= 1.0


def _current_sigma(scheduler, t, schedule: VPSchedule) -> float:
    """σ of the sample the scheduler is about to evaluate at timestep t."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None and hasattr(scheduler, "index_for_timestep"):
        idx = scheduler.step_index
        if idx is None:
            idx = scheduler.begin_index
        if idx is None:
            idx = scheduler.index_for_timestep(t)
        return float(sigmas[idx])
    return schedule.t_to_sigma(float(t))


def _start_index(scheduler, strength: float) -> int:
    """Index into `scheduler.timesteps` where a pass at denoising `strength` starts: the
    first model call of step ⌊n·(1 − strength)⌋ of the n steps (at least one step runs). A
    scheduler of `order` k (Heun: 2) lists k timesteps per step, so a step starts at every
    k-th entry; starting between them would begin inside a step and never denoise."""
    order = getattr(scheduler, "order", 1)
    n = -(-len(scheduler.timesteps) // order)   # Heun: 2n - 1 entries for n steps
    return min(int(n * (1.0 - strength)), n - 1) * order


def _unet_call(unet, x, t, cond: CfgCond):
    return unet(x, t, encoder_hidden_states=cond.states, added_cond_kwargs=cond.added).sample


def _unet_batch(cond: CfgCond, guidance_scale: float) -> tuple[CfgCond, list[Role], int]:
    """Conditioning, row roles and latent copies of one UNet call: both CFG branches, or
    only the cond rows when guidance is 1 (the uncond branch would cancel exactly)."""
    if guidance_scale == 1.0:
        return cond.cond_rows(), [Role(i) for i in range(cond.batch)], 1
    return cond, cfg_roles(cond.batch), 2


def _denoise(unet, scheduler, latents, timesteps, cond: CfgCond, guidance_scale: float,
             generator, schedule: VPSchedule, run: FamRun | None, record: bool):
    call_cond, roles, copies = _unet_batch(cond, guidance_scale)
    step_kw = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    guide = run is not None and not record
    step_sigma = _guide_corrector(scheduler, run) if guide else [0.0]
    for t in timesteps:
        sigma = step_sigma[0] = _current_sigma(scheduler, t, schedule)
        if guide:
            run.guide_latent(latents, sigma)
        inp = scheduler.scale_model_input(torch.cat([latents] * copies), t)
        if run is not None:
            run.begin_call(sigma, roles, latents.shape[-2:],
                           replay=(sigma, inp, t, call_cond, roles) if record else None)
        out = _unet_call(unet, inp, t, call_cond)
        if copies == 2:
            eps_u, eps_c = out.chunk(2)
            out = eps_u + guidance_scale * (eps_c - eps_u)
        latents = scheduler.step(out, t, latents, **step_kw).prev_sample
    return latents


def _guide_corrector(scheduler, run: FamRun) -> list[float]:
    """UniPC's corrector rebuilds the current latent inside `step()` from the previous one,
    dropping FM's edit, and its predictor then starts from the rebuilt latent: FM edits that
    one too, at the step's σ, so the sampler's own update uses the FM latent
    (docs/method.md §1 step 4). Patches this pass's own scheduler instance; returns the cell
    the loop keeps at the σ of the current step."""
    step_sigma = [0.0]
    correct = getattr(scheduler, "multistep_uni_c_bh_update", None)
    if correct is not None:
        def corrected(*args, **kwargs):
            sample = correct(*args, **kwargs)
            run.guide_latent(sample, step_sigma[0])
            return sample

        scheduler.multistep_uni_c_bh_update = corrected
    return step_sigma


@dataclass
class FamResult:
    native: torch.Tensor                       # clean native latent z⁰
    hires: torch.Tensor                        # clean high-res latent
    run: FamRun | None = None                  # what FAM did (report(), counters)
    info: dict = field(default_factory=dict)


Progress = Callable[[str, Sequence], Iterable]


def generate(unet, scheduler, cond: CfgCond, *, native_hw, hires_hw, steps: int,
             params: FamParams, guidance_scale: float = 7.5, seed: int | Sequence[int] = 0,
             hires_cond: CfgCond | None = None, hires_steps: int | None = None,
             denoising_strength: float = 1.0, am_layers: Sequence[AttnLayer] | None = None,
             progress: Progress | None = None) -> FamResult:
    """Native pass at `native_hw` (latent size), then a high-res pass at `hires_hw` from the
    bicubic-upsampled native latent: with FAM when `params.enabled`, else a plain Hires fix
    (same noise, steps and schedule). `full_renoise` forces denoising strength 1.0. With
    `guidance_scale` 1 only the cond rows of `cond` are evaluated.

    `seed`: one generator for the whole batch, or one seed per image, so that image i of a
    batch is the image a batch of one makes with seed[i]. `progress(pass_name, timesteps)`
    may wrap each pass's timesteps (e.g. in a tqdm bar); pass names "native" and "hires"."""
    dev, dtype = unet.device, unet.dtype
    hires_cond = hires_cond or cond
    schedule = VPSchedule(scheduler.alphas_cumprod)
    B, C = cond.batch, unet.config.in_channels
    if isinstance(seed, int):
        gen = torch.Generator("cpu").manual_seed(seed)
    else:
        if len(seed) != B:
            raise ValueError(f"generate: {len(seed)} seeds for a batch of {B}")
        gen = [torch.Generator("cpu").manual_seed(int(s)) for s in seed]

    def noise(hw):
        if isinstance(gen, list):
            rows = [torch.randn((1, C, *hw), generator=g, dtype=torch.float32) for g in gen]
            return torch.cat(rows).to(dev, dtype)
        return torch.randn((B, C, *hw), generator=gen, dtype=torch.float32).to(dev, dtype)

    def steps_of(name, timesteps):
        return progress(name, timesteps) if progress else timesteps

    run = None
    layers: Sequence[AttnLayer] = ()
    if params.enabled:
        layers = am_layers or discover(unet).am_layers(params.am_block_indices)
        run = FamRun(params, layers, schedule)

    native_sched = type(scheduler).from_config(scheduler.config)
    native_sched.set_timesteps(steps, device=dev)
    hires_sched = type(scheduler).from_config(scheduler.config)
    hires_sched.set_timesteps(hires_steps or steps, device=dev)
    strength = 1.0 if params.enabled and params.full_renoise else denoising_strength
    t_start = _start_index(hires_sched, strength)
    if t_start and hasattr(hires_sched, "set_begin_index"):
        hires_sched.set_begin_index(t_start)
    hires_timesteps = hires_sched.timesteps[t_start:]

    with torch.inference_mode(), fam_processors(run, layers):
        try:
            if run:
                run.begin_native()
            x = noise(native_hw) * native_sched.init_noise_sigma
            z_native = _denoise(unet, native_sched, x, steps_of("native", native_sched.timesteps),
                                cond, guidance_scale, gen, schedule, run, record=True)
            z0 = upsample_latent(z_native, hires_hw)
            eps = noise(hires_hw)
            sigma0 = _current_sigma(hires_sched, hires_timesteps[0], schedule)
            vp = _is_vp(hires_sched)
            x = noised_reference(z0, eps, sigma0, vp=vp)
            if run:
                run.begin_hires(z0, eps, vp=vp, replay_can_stop=True,
                                replay_fn=lambda payload: _replay(unet, run, payload))
            z_hires = _denoise(unet, hires_sched, x, steps_of("hires", hires_timesteps),
                               hires_cond, guidance_scale, gen, schedule, run, record=False)
            return FamResult(z_native, z_hires, run, run.report() if run else {})
        finally:
            if run:
                run.end()


def _replay(unet, run: FamRun, payload) -> None:
    sigma, inp, t, cond, roles = payload
    run.begin_call(sigma, roles, inp.shape[-2:])
    _unet_call(unet, inp, t, cond)
