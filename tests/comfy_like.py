"""Stand-ins for what the ComfyUI host meets in ComfyUI, written for these tests from reading
its public source (never copied), small enough for CI. The UNet dialect is Forge's (ComfyUI
invented it): the transformer blocks and the patcher's attn1 / wrapper setters come from
`forge_like`, the UNet from benchmarks/ldm.py. Added here:

  * `ModelPatcher`: `clone()` (model options deep-copied, wrappers copied per list),
    `add_wrapper_with_key`, object patches and `get_model_object`;
  * `BaseModel` / `SDXL`: `apply_model` takes σ and gives x0 through the model sampling
    (ε or v, ComfyUI's noise scaling), a latent format with a scale factor, the config class
    that names the family; SDXL's `y` (pooled text + size embeddings) reaches the UNet;
  * `install(monkeypatch)`: the `comfy` modules the host imports — `comfy.sample.sample` runs
    the KSampler path: σ from the scheduler (denoise slicing, UniPC's dropped penultimate σ),
    processed conds with uuids, model wrappers (SAMPLER_SAMPLE, PREDICT_NOISE), the CFG batch
    (chunks taken last-first, `max_chunks` per call, area conds on a crop of the latent,
    ControlNet residuals made per call by the cond's control object), the model function
    wrapper, samplers euler / heun / dpmpp_2m and a UniPC whose corrector rebuilds its VP
    latent from copies and hands it to the callback."""

from __future__ import annotations

import copy
import math
import sys
import uuid
from types import ModuleType, SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import forge_like
from benchmarks import ldm

_AC = forge_like.a1111_like.ALPHAS_CUMPROD
SD_SIGMAS = ((1 - _AC) / _AC).sqrt().float()   # the Forge tests' σ table


# ---- the model -----------------------------------------------------------------------------
class ModelSamplingDiscrete(nn.Module):
    def __init__(self, sigmas=SD_SIGMAS):
        super().__init__()
        self.register_buffer("sigmas", sigmas.float().clone())

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    @property
    def sigma_min(self):
        return self.sigmas[0]

    def timestep(self, sigma):
        """The nearest index of σ in the table, as ComfyUI's."""
        dists = sigma.float().log()[None] - self.sigmas.log()[:, None]
        return dists.abs().argmin(0).view(sigma.shape).float()


class EPS:
    def calculate_input(self, sigma, x):
        return x * (sigma[:, None, None, None] ** 2 + 1) ** -0.5

    def calculate_denoised(self, sigma, out, x):
        return x - out * sigma[:, None, None, None]

    def noise_scaling(self, sigma, noise, latent, max_denoise=False):
        scale = torch.sqrt(1.0 + sigma ** 2.0) if max_denoise else sigma
        return noise * scale + latent


class V_PREDICTION(EPS):
    def calculate_denoised(self, sigma, out, x):
        s = sigma[:, None, None, None]
        return x / (s ** 2 + 1) - out * s / (s ** 2 + 1) ** 0.5


def sampling(*bases, sigmas=SD_SIGMAS):
    """A model sampling object of ComfyUI's dynamic class `ModelSampling(bases…)`."""
    cls = type("ModelSampling", bases or (ModelSamplingDiscrete, EPS), {})
    if issubclass(cls, ModelSamplingDiscrete):
        return cls(sigmas)
    ms = cls()              # a continuous or flow schedule: σ without the discrete table
    ms.sigmas = sigmas
    return ms


def named(name, *bases):
    return type(name, bases or (object,), {})


class LatentFormat:
    scale_factor = 0.5

    def process_in(self, latent):
        return latent * self.scale_factor

    def process_out(self, latent):
        return latent / self.scale_factor


class BaseModel(nn.Module):
    """σ in, x0 out: `model_sampling` scales the input and turns the UNet's output into x0."""

    def __init__(self, unet, config="SD15", model_sampling=None):
        super().__init__()
        self.diffusion_model = unet
        self.model_config = named(config)()
        self.model_sampling = model_sampling if model_sampling is not None else sampling()
        self.latent_format = LatentFormat()

    def context(self, c_crossattn, y):
        return c_crossattn

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None,
                    transformer_options=None, y=None, **kwargs):
        ms = self.model_sampling
        out = run_unet(self.diffusion_model, ms.calculate_input(t, x), ms.timestep(t),
                       self.context(c_crossattn, y), control, transformer_options)
        return ms.calculate_denoised(t, out, x)


SKIPPED_CONTROL = [0]   # ControlNet residuals of the wrong size, skipped with a warning


def run_unet(unet, x, timesteps, context, control, transformer_options):
    """The UNet with a ControlNet's middle residual: popped from `control["middle"]` (the
    UNet consumes it), skipped when its shape does not fit, as ComfyUI's UNet does."""
    def add(module, args, out):
        residual = control["middle"].pop()
        if residual.shape == out.shape:
            return out + residual
        SKIPPED_CONTROL[0] += 1
        return out

    handle = (unet.middle_block.register_forward_hook(add)
              if control and control.get("middle") else None)
    try:
        return unet(x, timesteps, context, transformer_options=transformer_options)
    finally:
        if handle is not None:
            handle.remove()


def embed(v: torch.Tensor) -> torch.Tensor:
    """SDXL's `Timestep(256)` stand-in: one number to a 4-wide embedding."""
    return torch.cat([(v / 100).sin(), (v / 100).cos(), (v / 500).sin(), (v / 500).cos()])[None]


class SDXL(BaseModel):
    """`y` = pooled text (4) ++ embeddings of height, width, crop top, crop left, target height,
    target width (4 each); it becomes one more context token, so the size it says matters."""

    Y_DIM = 4 + 6 * 4

    def __init__(self, unet, config="SDXL", model_sampling=None, context_dim=8):
        super().__init__(unet, config, model_sampling)
        self.embedder = embed
        self.y_proj = nn.Linear(self.Y_DIM, context_dim)

    def encode_adm(self, pooled, height, width):
        sizes = [embed(torch.tensor([float(v)])) for v in (height, width, 0, 0, height, width)]
        return torch.cat([pooled, torch.cat(sizes, 1).expand(pooled.shape[0], -1)], 1)

    def context(self, c_crossattn, y):
        return torch.cat([c_crossattn, self.y_proj(y)[:, None]], 1)


class ModelPatcher(forge_like.UnetPatcher):
    def __init__(self, model, load_device="cpu"):
        super().__init__(model, load_device)
        self.wrappers: dict = {}
        self.object_patches: dict = {}

    def clone(self):
        n = ModelPatcher(self.model, self.load_device)
        n.model_options = copy.deepcopy(self.model_options)
        n.wrappers = {t: {k: list(v) for k, v in d.items()} for t, d in self.wrappers.items()}
        n.object_patches = dict(self.object_patches)
        return n

    def add_wrapper_with_key(self, wrapper_type, key, wrapper):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def get_model_object(self, name):
        return self.object_patches.get(name, getattr(self.model, name))

    def state(self):
        """What a FAM node must leave as it found it."""
        return (copy.deepcopy(self.model_options), copy.deepcopy(self.wrappers),
                dict(self.object_patches))


def patcher(unet, config="SD15", model_sampling=None, sdxl=False):
    cls = SDXL if sdxl else BaseModel
    return ModelPatcher(cls(unet, config, model_sampling))


class Control:
    """A ControlNet: residuals for the middle block from its hint resized to each call's
    latent and from the call's latent; `calls` keeps the latent size of every call."""

    def __init__(self, hint: torch.Tensor, channels: int, strength: float = 1.0, seed: int = 3):
        g = torch.Generator().manual_seed(seed)
        self.hint, self.strength = hint, strength
        self.weight = torch.randn(channels, hint.shape[1] + 4, generator=g) * 0.5
        self.calls: list[tuple[int, int]] = []

    def pre_run(self, model):
        self.model = model

    def get_control(self, x, t, cond, batched_number, transformer_options):
        self.calls.append(tuple(x.shape[-2:]))
        depth = sum(1 for b in self.model.diffusion_model.input_blocks
                    if any(isinstance(m, ldm.Downsample) for m in b))
        size = tuple(-(-n // 2 ** depth) for n in x.shape[-2:])
        hint = F.interpolate(self.hint, size=tuple(8 * n for n in x.shape[-2:]), mode="nearest")
        feats = torch.cat([F.adaptive_avg_pool2d(hint, size).expand(x.shape[0], -1, -1, -1),
                           F.adaptive_avg_pool2d(x, size).tanh()], 1)
        residual = torch.einsum("oc,bchw->bohw", self.weight, feats) * self.strength
        return {"middle": [residual]}


# ---- the sampling machinery ------------------------------------------------------------------
PREDICT_NOISE, SAMPLER_SAMPLE = "predict_noise", "sampler_sample"


class Executor:
    """ComfyUI's WrapperExecutor: each wrapper gets the executor of the rest of the chain."""

    def __init__(self, original, class_obj, wrappers, idx=0):
        self.original, self.class_obj, self.wrappers, self.idx = original, class_obj, wrappers, idx

    def __call__(self, *args, **kwargs):
        return Executor(self.original, self.class_obj, self.wrappers, self.idx + 1).execute(
            *args, **kwargs)

    def execute(self, *args, **kwargs):
        if self.idx == len(self.wrappers):
            return self.original(*args, **kwargs)
        return self.wrappers[self.idx](self, *args, **kwargs)


def _wrappers(options, kind):
    return [w for ws in options["transformer_options"].get("wrappers", {}).get(kind, {}).values()
            for w in ws]


class Guider:
    """CFGGuider: one sampling run of `patcher` with its conds; `max_chunks` limits the chunks
    of one UNet call (ComfyUI's memory split)."""

    max_chunks = None
    calls: list = []      # (cond_or_uncond, latent hw) of every UNet call

    def __init__(self, patcher, positive, negative, cfg):
        self.patcher, self.cfg = patcher, cfg
        self.original = {"positive": positive, "negative": negative}

    def _conds(self, entries, model, noise):
        out = []
        for tensor, extra in entries:
            cond = {"uuid": uuid.uuid4(), "cross_attn": tensor, "control": extra.get("control"),
                    "area": extra.get("area")}
            if isinstance(model, SDXL):
                cond["y"] = model.encode_adm(extra["pooled_output"], 8 * noise.shape[-2],
                                             8 * noise.shape[-1])
            if cond["control"] is not None:
                cond["control"].pre_run(model)
            out.append(cond)
        return out

    def sample(self, noise, latent, sampler_name, sigmas, callback, seed):
        patcher = self.patcher
        to = dict(patcher.model_options["transformer_options"])
        to["wrappers"] = {t: {k: list(v) for k, v in d.items()} for t, d in patcher.wrappers.items()}
        self.model_options = {**patcher.model_options, "transformer_options": to}
        self.model = patcher.model
        self.sampling = patcher.get_model_object("model_sampling")
        self.conds = {k: self._conds(v, self.model, noise) for k, v in self.original.items()}
        if torch.count_nonzero(latent) > 0:
            latent = self.model.latent_format.process_in(latent)
        self.sampler_name = sampler_name
        sampler = SimpleNamespace(name=sampler_name)
        out = Executor(self._sampler_sample, sampler, _wrappers(self.model_options, SAMPLER_SAMPLE)
                       ).execute(self, sigmas, {"seed": seed}, callback, noise, latent, None, True)
        return self.model.latent_format.process_out(out.float())

    def _sampler_sample(self, guider, sigmas, extra_args, callback, noise, latent, mask, disable):
        ms = self.sampling
        max_denoise = math.isclose(float(ms.sigma_max), float(sigmas[0]), rel_tol=1e-5) \
            or float(sigmas[0]) > float(ms.sigma_max)
        x = ms.noise_scaling(sigmas[0], noise, latent, max_denoise)
        total = len(sigmas) - 1
        k_callback = None if callback is None else (
            lambda d: callback(d["i"], d["denoised"], d["x"], total))
        return SAMPLERS[self.sampler_name](self, x, sigmas, k_callback)

    def __call__(self, x, sigma):
        return Executor(self.predict_noise, self, _wrappers(self.model_options, PREDICT_NOISE)
                        ).execute(x, sigma, self.model_options, None)

    def predict_noise(self, x, sigma, model_options, seed):
        uncond = None if math.isclose(self.cfg, 1.0) else self.conds["negative"]
        cond, unc = calc_cond_batch(self, [self.conds["positive"], uncond], x, sigma)
        return cond if unc is None else unc + (cond - unc) * self.cfg


def calc_cond_batch(guider, conds, x, sigma):
    out = [torch.zeros_like(x) for _ in conds]
    counts = [torch.full_like(x, 1e-37) for _ in conds]
    to_run = []
    for kind, entries in enumerate(conds):
        for cond in entries or ():
            area = cond["area"]
            crop = x if area is None else x[:, :, area[2]:area[2] + area[0], area[3]:area[3] + area[1]]
            to_run.append((cond, kind, crop))
    while to_run:
        first = to_run[0]
        fits = [i for i, r in enumerate(to_run) if r[2].shape == first[2].shape
                and r[0]["control"] is first[0]["control"]]
        fits.reverse()
        batch = [to_run.pop(i) for i in fits[:guider.max_chunks or len(fits)]]
        kinds, rows = [r[1] for r in batch], first[2].shape[0]
        input_x = torch.cat([r[2] for r in batch])
        t = torch.cat([sigma] * len(batch))
        to = dict(guider.model_options["transformer_options"], cond_or_uncond=kinds[:],
                  uuids=[r[0]["uuid"] for r in batch], sigmas=sigma)
        c = {"c_crossattn": torch.cat([r[0]["cross_attn"].expand(rows, -1, -1) for r in batch]),
             "transformer_options": to}
        if "y" in first[0]:
            c["y"] = torch.cat([r[0]["y"].expand(rows, -1) for r in batch])
        control = first[0]["control"]
        if control is not None:
            c["control"] = control.get_control(input_x, t, c, len(kinds), to)
        wrapper = guider.model_options.get("model_function_wrapper")
        model = guider.model
        if wrapper is not None:
            res = wrapper(model.apply_model, {"input": input_x, "timestep": t, "c": c,
                                              "cond_or_uncond": kinds})
        else:
            res = model.apply_model(input_x, t, **c)
        Guider.calls.append((kinds, tuple(input_x.shape[-2:])))
        for chunk, (cond, kind, _) in zip(res.chunk(len(batch)), batch):
            area = cond["area"]
            region = (slice(None),) * 2 + (() if area is None else (
                slice(area[2], area[2] + area[0]), slice(area[3], area[3] + area[1])))
            out[kind][region] += chunk
            counts[kind][region] += 1
    return [o / c for o, c in zip(out, counts)]


# ---- samplers (k-diffusion's update rules; UniPC shaped like ComfyUI's) ---------------------
def sample_euler(model, x, sigmas, callback):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if callback:
            callback({"x": x, "i": i, "denoised": denoised})
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


def sample_heun(model, x, sigmas, callback):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if callback:
            callback({"x": x, "i": i, "denoised": denoised})
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, sigmas[i + 1] * s_in)) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


def sample_dpmpp_2m(model, x, sigmas, callback):
    s_in = x.new_ones([x.shape[0]])
    old = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if callback:
            callback({"x": x, "i": i, "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old is None:
            d = denoised
        else:
            r = (t - (-sigmas[i - 1].log())) / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * d
        old = denoised
    return x


def sample_unipc(model, x, sigmas, callback):
    """ComfyUI's UniPC shape: VP latents, the model called on a rescaled copy, a corrector that
    rebuilds the latent after the model call, the callback after each step with the latent the
    next step starts from (after the last step, the finished one), no model call at the end."""
    ts = sigmas.clone()
    if ts[-1] == 0:
        ts[-1] = 0.001
    alpha = lambda s: (1 + s ** 2) ** -0.5          # noqa: E731
    std = lambda s: s * alpha(s)                     # noqa: E731
    s_in = x.new_ones([x.shape[0]])

    def model_x0(x_vp, s):
        return model(x_vp * (1 + s ** 2) ** 0.5, s * s_in)

    def update(x, m_prev, s_prev, s, corrector):
        eps = (x - alpha(s_prev) * m_prev) / std(s_prev)
        predicted = alpha(s) * m_prev + std(s) * eps
        if not corrector:
            return predicted, None
        m = model_x0(predicted, s)
        return predicted + alpha(s) * 0.5 * (m - m_prev), m

    x = x * alpha(ts[0])
    steps = len(ts) - 1
    models = []
    for step_index in range(steps):
        if step_index == 0:
            models.append(model_x0(x, ts[0]))
        else:
            for step in range(step_index, step_index + 1 + (step_index == steps - 1)):
                x, m = update(x, models[-1], ts[step - 1], ts[step], corrector=step < steps)
                if m is not None:
                    models.append(m)
        if callback:
            callback({"x": x, "i": step_index, "denoised": models[-1]})
    return x / alpha(ts[-1])


SAMPLERS = {"euler": sample_euler, "heun": sample_heun, "dpmpp_2m": sample_dpmpp_2m,
            "uni_pc": sample_unipc}
SCHEDULERS = ["simple", "karras"]
DISCARD_PENULTIMATE = {"uni_pc"}


def calculate_sigmas(ms, scheduler, steps):
    if scheduler == "simple":
        ss = len(ms.sigmas) / steps
        sig = [float(ms.sigmas[-(1 + int(x * ss))]) for x in range(steps)]
    elif scheduler == "karras":
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        lo, hi = float(ms.sigma_min) ** (1 / 7), float(ms.sigma_max) ** (1 / 7)
        sig = ((hi + ramp * (lo - hi)) ** 7).tolist()
    else:
        raise ValueError(scheduler)
    return torch.tensor(sig + [0.0], dtype=torch.float32)


def ksampler_sigmas(patcher, sampler_name, scheduler, steps, denoise):
    ms = patcher.get_model_object("model_sampling")

    def calc(n):
        discard = sampler_name in DISCARD_PENULTIMATE
        s = calculate_sigmas(ms, scheduler, n + discard)
        return torch.cat([s[:-2], s[-1:]]) if discard else s

    if denoise is None or denoise > 0.9999:
        return calc(steps)
    return calc(int(steps / denoise))[-(steps + 1):]


class InterruptProcessingException(Exception):
    pass


# ---- the modules the host imports -----------------------------------------------------------
class Comfy:
    """What the fake ComfyUI records: progress updates, attention precisions, interrupts."""

    def __init__(self):
        self.progress: list[tuple[int, int]] = []
        self.precisions: list = []
        self.interrupt_at: int | None = None   # raise at this progress update (Cancel)
        self.sampled: list[str] = []           # sampler of every sampling run

    def prepare_noise(self, latent, seed, noise_inds=None):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(latent.size(), generator=g, dtype=latent.dtype)

    def sample(self, model, noise, steps, cfg, sampler_name, scheduler, positive, negative,
               latent_image, denoise=1.0, callback=None, disable_pbar=False, seed=None, **kw):
        sigmas = ksampler_sigmas(model, sampler_name, scheduler, steps, denoise)
        guider = Guider(model, positive, negative, cfg)
        self.sampled.append(sampler_name)
        return guider.sample(noise, latent_image, sampler_name, sigmas, callback, seed)

    def prepare_callback(self, model, steps):
        def callback(step, x0, x, total_steps):
            if self.interrupt_at is not None and len(self.progress) >= self.interrupt_at:
                raise InterruptProcessingException()
            self.progress.append((step + 1, total_steps))
        return callback

    def optimized_attention(self, q, k, v, heads, attn_precision=None, **kwargs):
        self.precisions.append(attn_precision)
        return forge_like._attention(q, k, v, heads)


def install(monkeypatch) -> Comfy:
    """Put the fake `comfy` modules (and `latent_preview`) in sys.modules for one test."""
    api = Comfy()
    mods = {name: ModuleType(name) for name in (
        "comfy", "comfy.sample", "comfy.samplers", "comfy.utils", "comfy.patcher_extension",
        "comfy.ldm", "comfy.ldm.modules", "comfy.ldm.modules.attention", "latent_preview")}
    mods["comfy.sample"].__dict__.update(
        sample=api.sample, prepare_noise=api.prepare_noise,
        fix_empty_latent_channels=lambda model, latent, *a: latent)
    mods["comfy.samplers"].KSampler = SimpleNamespace(
        SAMPLERS=list(SAMPLERS) + ["sa_solver"], SCHEDULERS=SCHEDULERS)
    mods["comfy.utils"].PROGRESS_BAR_ENABLED = True
    mods["comfy.patcher_extension"].WrappersMP = SimpleNamespace(
        PREDICT_NOISE=PREDICT_NOISE, SAMPLER_SAMPLE=SAMPLER_SAMPLE)
    mods["comfy.ldm.modules.attention"].optimized_attention = api.optimized_attention
    mods["latent_preview"].prepare_callback = api.prepare_callback
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(mods[parent], child, mod)
    monkeypatch.setattr(Guider, "calls", [])
    monkeypatch.setattr(Guider, "max_chunks", None)
    return api
