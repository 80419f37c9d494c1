"""Stand-ins for AUTOMATIC1111 1.10, small enough for CI.

Torch level: the UNet, CFG denoiser and Euler of benchmarks/ldm.py (A1111's batch layout:
per image its cond rows, then the uncond rows; optionally split into several UNet calls or
without the uncond rows), with DDIM and a predictor-corrector loop shaped like A1111's UniPC.

WebUI level (`MiniWebUI`): the few `modules.*` names `scripts/fam_diffusion.py` imports, with
processing objects whose `sample` calls the script hooks in A1111's order (`process`, per
batch `p.sample` → sampler created → `process_before_every_sampling` → first pass →
`sample_hr_pass` → hires sampler → `process_before_every_sampling` → hires pass, then
`postprocess`), a script runner that logs and swallows hook exceptions as A1111's does, and
a VAE stand-in that samples its posterior with the global RNG."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.ldm import (CFG, SD_BETAS as BETAS, SD_SCHEDULE as SCHEDULE, Denoiser,  # noqa: F401
                           euler, sigma_to_t)
from fam.params import FamParams

ROOT = Path(__file__).resolve().parents[1]
ALPHAS_CUMPROD = torch.cumprod(1 - BETAS, 0)
TIMESTEPS = [1, 251, 501, 751, 999]


# ---- torch level --------------------------------------------------------------------------
@contextlib.contextmanager
def host_reads():
    """Counts the tensor values read on the host while it is open (on a GPU each is a
    device→host synchronisation): `with host_reads() as n: ...; n[0]`."""
    count = [0]
    names = ("__float__", "__int__", "__index__", "__bool__", "item", "tolist")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counted(read):
        def wrapper(self, *args, **kwargs):
            count[0] += 1
            return read(self, *args, **kwargs)
        return wrapper

    for name, read in originals.items():
        setattr(torch.Tensor, name, counted(read))
    try:
        yield count
    finally:
        for name, read in originals.items():
            setattr(torch.Tensor, name, read)


def extra_host_reads(generate, model, **kw):
    """Host reads a FAM generation makes beyond the same generation without FAM, and the FAM
    generation's result: `generate(model, params=…, **kw)`."""
    with host_reads() as fam:
        result = generate(model, **kw)
    with host_reads() as plain:
        generate(model, FamParams(), **kw)
    return fam[0] - plain[0], result


def conds(batch=1, parts=1, seed=0, dim=8):
    g = torch.Generator().manual_seed(seed)
    multicond = SimpleNamespace(batch=[[torch.randn(3, dim, generator=g) for _ in range(parts)]
                                       for _ in range(batch)])
    return multicond, torch.randn(batch, 3, dim, generator=g)


def sigmas(steps=4):
    return torch.tensor([14.6, 4.0, 1.2, 0.3][:steps] + [0.0], dtype=torch.float32)


WEBUI_ALPHA_BAR_T = 4.8973451890853435e-08


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The WebUIs' zero-terminal-SNR rescale of an ᾱ table (A1111's noise schedule setting,
    Forge's `ztsnr` checkpoints): √ᾱ shifted to end at 0 and scaled to keep its first value,
    then ᾱ_T pinned to a tiny positive value (σ_max ≈ 4518.76)."""
    s = alphas_cumprod.sqrt()
    first, last = s[0].clone(), s[-1].clone()
    ab = ((s - last) * (first / (first - last))) ** 2
    ab[-1] = WEBUI_ALPHA_BAR_T
    return ab


def discrete_sigmas(alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """k-diffusion's `get_sigmas` on a discrete table: t evenly from T−1 down to 0, σ
    interpolated linearly in log σ between the table's entries, then a final 0."""
    log_sigmas = ((1 - alphas_cumprod.double()) / alphas_cumprod.double()).sqrt().log()
    t = torch.linspace(len(log_sigmas) - 1, 0, steps, dtype=torch.float64)
    low = t.floor().long().clamp(max=len(log_sigmas) - 2)
    w = t - low
    out = ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()
    return torch.cat([out, out.new_zeros(1)]).float()


class ModelDenoiser(Denoiser):
    """A1111's denoisers as built from the loaded model when a sampler is made: the σ table
    of `sd_model.alphas_cumprod` (as it is at that moment), v-prediction when the model's
    `parameterization` is "v" (`CompVisVDenoiser`: x₀ = x/(σ²+1) − v·σ/√(σ²+1), model input
    x/√(σ²+1); the timestep form returns ε = √ᾱ·v + √(1−ᾱ)·x). The UNet runs in its own
    dtype (A1111's half-precision UNet), the sampler's latent stays float32."""

    def __init__(self, sd_model, vp=False, log=None):
        ac = self.alphas_cumprod = sd_model.alphas_cumprod.float()
        table = SimpleNamespace(log_sigmas=((1 - ac) / ac).sqrt().log())   # repeats allowed
        super().__init__(sd_model.model.diffusion_model, vp, table, log)
        self.v = getattr(sd_model, "parameterization", "eps") == "v"

    def _unet(self, x, t, cond):
        dtype = next(self.unet.parameters()).dtype
        context, y = cond["c_crossattn"][0], cond.get("vector")
        y = None if y is None else y.to(dtype)
        return self.unet(x.to(dtype), t, context.to(dtype), y).to(x.dtype)

    def forward(self, x, sigma, cond):
        if self.log is not None:
            self.log.append((tuple(x.shape[-2:]), cond))
        if self.vp:
            out = self._unet(x, sigma, cond)
            if not self.v:
                return out
            a = self.alphas_cumprod[sigma.round().long()][:, None, None, None]
            return a.sqrt() * out + (1 - a).sqrt() * x
        s = sigma.float()[:, None, None, None]
        c_in = (s * s + 1) ** -0.5
        out = self._unet(x * c_in, sigma_to_t(sigma, self.log_sigmas), cond)
        if self.v:
            return x * (1 / (s * s + 1)) - out * (s * c_in)
        return x - s * out


def ddim(cfg, x, ts, cond, uncond, scale=5.0, callback=None):
    ac = ALPHAS_CUMPROD.float()
    for i in reversed(range(len(ts))):
        t = ts[i]
        e = cfg(x, torch.full((x.shape[0],), float(t)), uncond=uncond, cond=cond, cond_scale=scale)
        a, a_prev = ac[t], (ac[ts[i - 1]] if i else torch.tensor(1.0))
        x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
        if callback is not None:
            callback({"x": x, "i": len(ts) - 1 - i, "denoised": x0})
    return x


def unipc(cfg, x, ts, cond, uncond, scale=5.0, callback=None, fm=None):
    """Shaped like A1111's UniPC (data prediction, VP): the model is called at the predictor's
    latent; the corrector then rebuilds that latent from the previous one and the model
    outputs (not from the latent the model saw), hands it to `callback` and the next step
    starts from it; the last step has no corrector. `fm(x, t)`, when given, is the method's
    FM written into this loop by hand: on the model's input and on the corrected latent."""
    ac = ALPHAS_CUMPROD.float()
    alpha, sigma = (lambda t: ac[t].sqrt()), (lambda t: (1 - ac[t]).sqrt())

    def model(z, t):
        if fm is not None:
            fm(z, t)
        e = cfg(z, torch.full((z.shape[0],), float(t)), uncond=uncond, cond=cond, cond_scale=scale)
        return (z - sigma(t) * e) / alpha(t)

    order = list(reversed(ts))
    m_prev = model(x, order[0])
    for k, t in enumerate(order[1:], start=1):
        t_prev = order[k - 1]
        base = sigma(t) / sigma(t_prev) * x + (alpha(t) - sigma(t) / sigma(t_prev) * alpha(t_prev)) * m_prev
        x_p = base.clone()
        if k == len(order) - 1:               # final step: predictor only
            x = x_p
            if callback is not None:
                callback({"x": x, "i": k - 1, "denoised": None})
            break
        m = model(x_p, t)
        x = base + 0.5 * alpha(t) * (m - m_prev)   # corrector, from the previous latent
        if fm is not None:
            fm(x, t)
        if callback is not None:
            callback({"x": x, "i": k - 1, "denoised": m})
        m_prev = m
    return x


# ---- the WebUI ----------------------------------------------------------------------------
def sd_model(unet, title="tiny.safetensors", **flags):
    """The parts of an sd_model FAM reads."""
    return SimpleNamespace(model=SimpleNamespace(diffusion_model=unet),
                           alphas_cumprod=ALPHAS_CUMPROD.float(),
                           sd_checkpoint_info=SimpleNamespace(title=title), **flags)


class MiniWebUI:
    """A fresh miniature A1111 (its own `modules` objects) with the FAM script loaded."""

    def __init__(self):
        self.state = SimpleNamespace(interrupted=False)
        self.opts = SimpleNamespace(sd_vae_encode_method="Full")
        self.logged: list[str] = []          # what A1111 would print as "*** Error running …"
        self.infotext_pasted: list = []      # on_infotext_pasted callbacks
        self.encodes = 0
        self.xyz = self._xyz_module()
        self.modules = self._modules()
        self.script_module = self._load_script()
        self.Script = self.script_module.FamScript

    # ---- modules ---------------------------------------------------------------------
    def _xyz_module(self):
        m = types.ModuleType("xyz_grid")
        m.AxisOption = lambda label, type, apply, choices=None: SimpleNamespace(
            label=label, type=type, apply=apply, choices=choices)
        m.boolean_choice = lambda reverse=False: (lambda: ["False", "True"])
        m.axis_options = []
        return m

    def _modules(self):
        web = self
        mods = {name: types.ModuleType(name) for name in (
            "modules", "modules.images", "modules.processing", "modules.script_callbacks",
            "modules.scripts", "modules.sd_samplers_common", "modules.sd_samplers_timesteps",
            "modules.shared", "modules.infotext_utils", "modules.ui_components", "gradio")}

        class Script:
            def elem_id(self, item):
                return f"script_fam_diffusion_{item}"

        class XyzScript:
            pass
        XyzScript.__module__ = "xyz_grid.py"
        scripts = mods["modules.scripts"]
        scripts.Script, scripts.AlwaysVisible = Script, object()
        scripts.scripts_data = [SimpleNamespace(script_class=XyzScript, module=self.xyz)]
        mods["modules.script_callbacks"].on_before_ui = lambda fn: None
        mods["modules.script_callbacks"].on_infotext_pasted = self.infotext_pasted.append
        mods["modules.shared"].opts = self.opts
        mods["modules.shared"].state = self.state
        mods["modules.images"].resize_image = lambda mode, im, w, h: im.resize((w, h))

        def images_tensor_to_samples(batch, approximation=None, model=None):
            web.encodes += 1
            rgb = F.avg_pool2d(batch.float(), 8) * 2 - 1
            z = torch.cat([rgb, rgb.mean(1, keepdim=True)], 1)
            return z + 0.05 * torch.randn_like(z)   # the posterior sample: global RNG
        common = mods["modules.sd_samplers_common"]
        common.approximation_indexes = {"Full": 0}
        common.images_tensor_to_samples = images_tensor_to_samples
        mods["modules.sd_samplers_timesteps"].CompVisSampler = CompVisSampler
        processing = mods["modules.processing"]
        processing.StableDiffusionProcessingTxt2Img = Txt2Img
        processing.StableDiffusionProcessingImg2Img = Img2Img
        mods["modules.infotext_utils"].PasteField = lambda component, target: (component, target)
        mods["modules.ui_components"].InputAccordion = _Accordion
        gr = mods["gradio"]
        for name in ("HTML", "Checkbox", "Textbox", "Slider"):
            setattr(gr, name, _component(name))
        for name in ("Row", "Column", "Group", "Accordion"):
            setattr(gr, name, _layout(name))
        for name in ("images", "processing", "script_callbacks", "scripts", "sd_samplers_common",
                     "sd_samplers_timesteps", "shared", "infotext_utils", "ui_components"):
            setattr(mods["modules"], name, mods[f"modules.{name}"])
        return mods

    def _load_script(self):
        saved = {k: sys.modules.get(k) for k in self.modules}
        sys.modules.update(self.modules)
        try:
            spec = importlib.util.spec_from_file_location(
                f"fam_diffusion_script_{id(self)}", ROOT / "scripts" / "fam_diffusion.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
        finally:
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v

    # ---- jobs ------------------------------------------------------------------------
    def txt2img(self, model, args=(), **kw):
        return Txt2Img(self, model, args, **kw)

    def img2img(self, model, args=(), **kw):
        return Img2Img(self, model, args, **kw)

    def process_images(self, p):
        """process_images_inner's order, one batch per iteration. The global RNG (which the
        VAE stand-in samples from) starts from the job's seed, so jobs repeat exactly."""
        self.state.interrupted = False
        torch.manual_seed(p.seed)
        p.scripts.process(p)
        out, infotexts = [], []
        with torch.no_grad():
            p.init()
            for n in range(p.n_iter):
                if self.state.interrupted:
                    break
                p.iteration = n
                p.seeds = [p.seed + n * p.batch_size + i for i in range(p.batch_size)]
                with p.batch_schedule():
                    samples = p.sample(conditioning=p.c, unconditional_conditioning=p.uc,
                                       seeds=p.seeds, subseeds=p.seeds, subseed_strength=0,
                                       prompts=["a"] * p.batch_size)
                for i in range(len(samples)):   # per image, before its infotext
                    p.batch_index = i
                    p.scripts.postprocess_image(p, SimpleNamespace(image=samples[i]))
                infotexts.append(dict(p.extra_generation_params))
                out.append(samples)
        processed = SimpleNamespace(samples=out, infotexts=infotexts)
        p.scripts.postprocess(p, processed)
        return processed


class _Block:
    """A layout block; the blocks open while a component is made are its `parents`."""
    open_now: list = []

    def __init__(self, label=None, **kw):
        self.label = label
        self.__dict__.update(kw)

    def __enter__(self):
        _Block.open_now.append(self)
        return self

    def __exit__(self, *exc):
        _Block.open_now.pop()
        return False


def _layout(kind):
    return type(kind, (_Block,), {"kind": kind})


class _Accordion(_Block):
    kind = "InputAccordion"

    def __init__(self, value, label=None, elem_id=None):
        self.value, self.label, self.elem_id = value, label, elem_id
        self.accordion = SimpleNamespace()


def _component(kind):
    def make(*args, **kw):
        return SimpleNamespace(kind=kind, args=args, parents=tuple(_Block.open_now), **kw)
    return make


class Runner:
    """`p.scripts`: the FAM script and the always-on stand-ins of other extensions given
    (`others`, before FAM as their directory names sort, or after it), each with its slice
    of `p.script_args`; hook exceptions are logged and swallowed, as A1111's ScriptRunner
    does. `filtered(stems)` is the copy ADetailer makes for its inpaint passes."""

    def __init__(self, web, args, others=(), fam_first=False):
        self.web, self.script = web, web.Script()
        self.script.filename = str(ROOT / "scripts" / "fam_diffusion.py")
        fam = [(self.script, tuple(args))]
        pairs = fam + list(others) if fam_first else list(others) + fam
        self.alwayson_scripts, self.script_args = [], []
        for script, script_args in pairs:
            script.args_from = len(self.script_args)
            self.script_args += list(script_args)
            script.args_to = len(self.script_args)
            self.alwayson_scripts.append(script)

    @property
    def args(self):
        return tuple(self.script_args[self.script.args_from:self.script.args_to])

    def filtered(self, stems):
        runner = copy.copy(self)
        runner.alwayson_scripts = [s for s in self.alwayson_scripts
                                   if Path(getattr(s, "filename", "")).stem in stems]
        return runner

    def _call(self, name, p, *a, **kw):
        args = getattr(p, "script_args", self.script_args)
        for script in self.alwayson_scripts:
            hook = getattr(script, name, None)
            if hook is None:
                continue
            try:
                hook(p, *a, *args[script.args_from:script.args_to], **kw)
            except Exception as e:
                self.web.logged.append(f"Error running {name}: {type(e).__name__}: {e}")

    def process(self, p):
        self._call("process", p)

    def before_process(self, p):
        self._call("before_process", p)

    def process_before_every_sampling(self, p, **kw):
        self._call("process_before_every_sampling", p, **kw)

    def before_hr(self, p):
        pass

    def postprocess_image(self, p, pp):
        self._call("postprocess_image", p, pp)

    def postprocess(self, p, processed):
        self._call("postprocess", p, processed)


class KDiffusionSampler:
    def __init__(self, funcname, model, p):
        self.func = {"euler": euler}[funcname]
        self.model_wrap_cfg = CFG(model.model.diffusion_model, **p.cfg_kw())
        self.callbacks = 0
        if p.uses_model_schedule():   # the model's own table and parameterization
            wrap = self.model_wrap_cfg.model_wrap
            self.model_wrap_cfg.model_wrap = ModelDenoiser(model, wrap.vp, wrap.log)

    def callback_state(self, d):
        self.callbacks += 1

    def _run(self, p, x, sig, c, uc):
        return self.func(self.model_wrap_cfg, x, sig, c, uc, p.cfg_scale, self.callback_state)

    def sample(self, p, x, c, uc, steps=None, image_conditioning=None):
        sig = p.sampler_sigmas(steps or p.steps)
        return self._run(p, x * sig[0], sig, c, uc)

    def sample_img2img(self, p, x, noise, c, uc, steps=None, image_conditioning=None):
        sig = p.sampler_sigmas(steps or p.steps)
        sig = sig[len(sig) - 1 - max(1, round((len(sig) - 1) * p.denoising_strength)):]
        return self._run(p, x + noise * sig[0], sig, c, uc)


class CompVisSampler(KDiffusionSampler):
    def __init__(self, funcname, model, p):
        self.func = {"ddim": ddim, "unipc": unipc}[funcname]
        self.model_wrap_cfg = CFG(model.model.diffusion_model, vp=True, **p.cfg_kw())
        self.callbacks = 0

    def _run(self, p, x, ts, c, uc):
        return self.func(self.model_wrap_cfg, x, ts, c, uc, p.cfg_scale, self.callback_state)

    def sample(self, p, x, c, uc, steps=None, image_conditioning=None):
        return self._run(p, x, TIMESTEPS, c, uc)

    def sample_img2img(self, p, x, noise, c, uc, steps=None, image_conditioning=None):
        n = max(1, round(len(TIMESTEPS) * p.denoising_strength))
        ts = TIMESTEPS[:n]
        a = ALPHAS_CUMPROD.float()[ts[-1]]
        return self._run(p, a.sqrt() * x + (1 - a).sqrt() * noise, ts, c, uc)


SAMPLERS = {"Euler": (KDiffusionSampler, "euler"), "DDIM": (CompVisSampler, "ddim"),
            "UniPC": (CompVisSampler, "unipc")}


class Processing:
    def __init__(self, web, model, args, width=64, height=64, steps=4, batch_size=1, n_iter=1,
                 seed=1, sampler_name="Euler", parts=1, cfg_scale=5.0, denoising_strength=0.7,
                 ztsnr=False, downcast=False, others=(), fam_first=False):
        self.web, self.sd_model = web, model
        self.ztsnr, self.downcast = ztsnr, downcast   # the two σ table settings
        self.scripts = self.runner(web, args, others, fam_first)
        self.script_args = self.scripts.script_args
        self.width, self.height, self.steps = width, height, steps
        self.batch_size, self.n_iter, self.seed = batch_size, n_iter, seed
        self.sampler_name, self.cfg_scale = sampler_name, cfg_scale
        self.denoising_strength = denoising_strength
        self.c, self.uc = conds(batch_size, parts)
        self.extra_generation_params = {}
        self.sampler = None

    runner = Runner

    def create_sampler(self, name):
        kind, func = SAMPLERS[name]
        return kind(func, self.sd_model, self)

    def cfg_kw(self):
        """Options of the CFG stand-in for the sampler made now (tests set `cfg_kw_for`)."""
        make = getattr(self, "cfg_kw_for", None)
        return make(self) if make else {}

    def uses_model_schedule(self) -> bool:
        """Whether the sampler takes σ from the model's table (a ZTSNR run, a v model) instead
        of the short fixed schedule of the other tests."""
        return self.ztsnr or getattr(self.sd_model, "parameterization", "eps") == "v"

    def model_table(self) -> torch.Tensor:
        return self.sd_model.alphas_cumprod

    def sampler_sigmas(self, steps):
        if not self.uses_model_schedule():
            return sigmas(steps)
        return discrete_sigmas(self.model_table(), steps)

    @contextlib.contextmanager
    def batch_schedule(self):
        """A1111's `apply_alpha_schedule_override` right before each `p.sample`: the ᾱ table
        from the original, downcast to fp16 ("Downcast alphas_cumprod") and rescaled for zero
        terminal SNR ("Noise schedule: Zero Terminal SNR") as set."""
        model = self.sd_model
        if not (self.ztsnr or self.downcast):
            yield
            return
        before = model.alphas_cumprod
        ac = getattr(model, "alphas_cumprod_original", before)
        ac = ac.half() if self.downcast else ac
        model.alphas_cumprod = rescale_zero_terminal_snr(ac) if self.ztsnr else ac
        try:
            yield
        finally:
            model.alphas_cumprod = before

    def noise(self, hw):
        return torch.stack([torch.randn(4, *hw, generator=torch.Generator().manual_seed(s))
                            for s in self.seeds])

    def init(self):
        pass


class Txt2Img(Processing):
    def __init__(self, web, model, args, enable_hr=True, hr_scale=2, hr_upscaler="Latent",
                 hr_sampler_name=None, hr_model=None, firstpass_image=None,
                 interrupt_after_first_pass=False, **kw):
        super().__init__(web, model, args, **kw)
        self.enable_hr, self.hr_scale, self.hr_upscaler = enable_hr, hr_scale, hr_upscaler
        self.hr_sampler_name, self.hr_model = hr_sampler_name, hr_model
        self.firstpass_image = firstpass_image
        self.interrupt_after_first_pass = interrupt_after_first_pass
        self.hr_upscale_to_x, self.hr_upscale_to_y = int(self.width * hr_scale), int(self.height * hr_scale)
        self.truncate_x = self.truncate_y = 0
        self.latent_scale_mode = ({"mode": "bilinear", "antialias": False}
                                  if hr_upscaler.startswith("Latent") else None)
        self.is_hr_pass = False

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength,
               prompts):
        self.sampler = self.create_sampler(self.sampler_name)
        if self.firstpass_image is not None and self.enable_hr:   # the ✨ upscale button
            decoded = samples = None
            image = torch.from_numpy(np.asarray(self.firstpass_image, dtype=np.float32) / 255.0)
            image = image.permute(2, 0, 1)[None]
            if self.latent_scale_mode is None:
                decoded = image
            else:
                samples = self.web.modules["modules.sd_samplers_common"].images_tensor_to_samples(image)
        else:
            x = self.noise((self.height // 8, self.width // 8))
            self.scripts.process_before_every_sampling(self, x=x, noise=x, c=conditioning,
                                                       uc=unconditional_conditioning)
            samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning)
            if hasattr(self, "after_first_pass"):
                self.after_first_pass()
            if self.interrupt_after_first_pass:
                self.web.state.interrupted = True
            if not self.enable_hr:
                return samples
            decoded = None
        if self.hr_model is not None:    # reload_model_weights(hr_checkpoint_info)
            self.sd_model = self.hr_model
        return self.sample_hr_pass(samples, decoded, seeds, subseeds, subseed_strength, prompts)

    def sample_hr_pass(self, samples, decoded_samples, seeds, subseeds, subseed_strength, prompts):
        if self.web.state.interrupted:
            return samples
        self.is_hr_pass = True
        self.sampler = self.create_sampler(self.hr_sampler_name or self.sampler_name)
        hw = (self.hr_upscale_to_y // 8, self.hr_upscale_to_x // 8)
        if self.latent_scale_mode is not None:
            samples = F.interpolate(samples, size=hw, mode="bilinear")
        else:
            image = F.interpolate(decoded_samples, size=(hw[0] * 8, hw[1] * 8), mode="bicubic")
            samples = self.web.modules["modules.sd_samplers_common"].images_tensor_to_samples(image)
        noise = self.noise(hw)
        self.scripts.before_hr(self)
        self.scripts.process_before_every_sampling(self, x=samples, noise=noise, c=self.c, uc=self.uc)
        samples = self.sampler.sample_img2img(self, samples, noise, self.c, self.uc)
        self.is_hr_pass = False
        return samples


class Img2Img(Processing):
    def __init__(self, web, model, args, init_images=(), image_mask=None, resize_mode=0, **kw):
        super().__init__(web, model, args, **kw)
        self.init_images, self.image_mask, self.resize_mode = list(init_images), image_mask, resize_mode

    def init(self):
        self.sampler = self.create_sampler(self.sampler_name)
        arrays = [np.asarray(im.convert("RGB").resize((self.width, self.height)), dtype=np.float32)
                  / 255.0 for im in self.init_images]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        latents = self.web.modules["modules.sd_samplers_common"].images_tensor_to_samples(batch)
        self.init_latent = latents.expand(self.batch_size, -1, -1, -1) if len(arrays) == 1 else latents

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength,
               prompts):
        x = self.noise(tuple(self.init_latent.shape[-2:]))
        self.scripts.process_before_every_sampling(self, x=self.init_latent, noise=x,
                                                   c=conditioning, uc=unconditional_conditioning)
        return self.sampler.sample_img2img(self, self.init_latent, x, conditioning,
                                           unconditional_conditioning)


# ---- other extensions' always-on scripts ---------------------------------------------------
def _pixels(image, width, height):
    """A PIL image as ControlNet's hint: 1×3×H×W in [0, 1], resized to width×height."""
    a = np.asarray(image.convert("RGB").resize((width, height)), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1)[None]


class ControlParamsLike(SimpleNamespace):
    """One ControlNet unit as its UNet hook holds it (sd-webui-controlnet's `ControlParams`)."""


class ControlNetLike:
    """sd-webui-controlnet as FAM meets it. `process` builds a UNet hook for the job (kept as
    `latest_network`, its `model` the UNet) that replaces the UNet's instance `forward`; each
    enabled unit holds its hint at the target size (`hint_cond`: the unit's image, or the
    img2img input for a tile-style unit) and, in txt2img with Hires. fix, at the high-res
    size (`hr_hint_cond`). Per UNet call the hook picks a hint as ControlNet does (by height,
    only where a unit holds both) and adds a residual made from it: a hint of another size
    than the latent raises, as ControlNet's `h += guided_hint` does; `hr_option` turns a
    unit off for the pass it excludes (by the hint picked). Units with
    `uses_latent` encode their hint once per hint (`used_hint_cond_latent`, counted in
    `encodes`). `postprocess` restores the UNet. `log`: (latent hw, hint hw or None when off) per call."""

    filename = "controlnet.py"

    def __init__(self):
        self.latest_network = None
        self.log: list[tuple[tuple[int, int], tuple[int, int]]] = []
        self.encodes = 0

    def title(self):
        return "ControlNet"

    def process(self, p, *units):
        self.restore()
        params = []
        for unit in units:
            if not unit.get("enabled"):
                continue
            image = unit.get("image") or p.init_images[0]
            hint = _pixels(image, p.width, p.height)
            if unit.get("channels") == 4:   # an inpaint hint: RGB and the mask
                hint = torch.cat([hint, (hint[:, :1] > 0.5).float()], 1)
            hr = (_pixels(image, p.hr_upscale_to_x, p.hr_upscale_to_y)
                  if getattr(p, "enable_hr", False) else None)
            params.append(ControlParamsLike(
                hint_cond=hint, hr_hint_cond=hr, used_hint_cond=None, used_hint_cond_latent=None,
                used_hint_inpaint_hijack=None, uses_latent=bool(unit.get("uses_latent")),
                weight=float(unit.get("weight", 0.5)), hr_option=unit.get("hr_option", "Both")))
        if not params:
            return
        unet = p.sd_model.model.diffusion_model
        hook = SimpleNamespace(model=unet, control_params=params)
        outer = self

        def forward(x, timesteps=None, context=None, y=None, **kwargs):
            high_res = False
            for param in params:
                if param.used_hint_cond is None:
                    param.used_hint_cond = param.hint_cond
                    param.used_hint_cond_latent = param.used_hint_inpaint_hijack = None
                if isinstance(param.hr_hint_cond, torch.Tensor):
                    h = x.shape[2] * 8
                    low = abs(h - param.hint_cond.shape[2]) < abs(h - param.hr_hint_cond.shape[2])
                    want = param.hint_cond if low else param.hr_hint_cond
                    high_res = not low
                    if param.used_hint_cond is not want:
                        param.used_hint_cond = want
                        param.used_hint_cond_latent = param.used_hint_inpaint_hijack = None
            for param in params:
                hint = param.used_hint_cond
                off = {"Low res only": high_res, "High res only": not high_res}.get(param.hr_option, False)
                outer.log.append((tuple(x.shape[-2:]), None if off else tuple(hint.shape[-2:])))
                if off:
                    continue
                if param.uses_latent:
                    if param.used_hint_cond_latent is None:
                        outer.encodes += 1
                        param.used_hint_cond_latent = F.avg_pool2d(hint[:, :3], 8)
                    residual = param.used_hint_cond_latent
                else:
                    residual = F.avg_pool2d(hint[:, :3], 8)
                x = x + param.weight * residual.mean(1, keepdim=True).to(x.dtype)
            return type(unet).forward(unet, x, timesteps, context, y, **kwargs)

        unet.forward = forward
        self.latest_network = hook

    def restore(self):
        hook, self.latest_network = self.latest_network, None
        if hook is not None:
            hook.model.__dict__.pop("forward", None)

    def postprocess(self, p, processed, *units):
        self.restore()


class TiledDiffusionLike:
    """multidiffusion-upscaler's Tiled Diffusion: when enabled, `process` hijacks the
    sampler factory (marked by `create_sampler_original_md` on its class) and the sampler it
    makes denoises in tiles: here, each half of the latent in its own UNet call."""

    filename = "tilediffusion.py"

    def title(self):
        return "Tiled Diffusion"

    def process(self, p, enabled=False, *args):
        if not enabled:
            return
        type(self).create_sampler_original_md = p.create_sampler

        def create_sampler(name):
            sampler = type(self).create_sampler_original_md(name)
            inner = sampler.model_wrap_cfg.inner_model
            forward = inner.forward

            def tiled(x, sigma, **kw):
                w = x.shape[-1] // 2
                return torch.cat([forward(x[..., :w], sigma, **kw), forward(x[..., w:], sigma, **kw)], -1)
            inner.forward = tiled
            return sampler

        p.create_sampler = create_sampler

    def postprocess(self, p, processed, enabled=False, *args):
        if "create_sampler_original_md" in type(self).__dict__:
            del type(self).create_sampler_original_md
            p.__dict__.pop("create_sampler", None)


class TiledVAELike:
    """multidiffusion-upscaler's Tiled VAE: when enabled it replaces the VAE's encoder and
    decoder forwards; the sampler is untouched."""

    filename = "tilevae.py"

    def __init__(self):
        self.enabled_in = []

    def title(self):
        return "Tiled VAE"

    def process(self, p, enabled=False, *args):
        self.enabled_in.append(bool(enabled))


class ADetailerLike:
    """ADetailer's inpaint passes, in its call order: per image (`postprocess_image`, after
    the image is sampled and before its infotext), on the first image `postprocess` of every
    script on `copy(p)`; a new img2img job with a mask, whose scripts are `p`'s filtered by
    file name (`stems`; FAM is left out by default), whose args are element-wise copies of
    `p.script_args`, marked `_ad_inner`; `process_images` of a copy per mask, exceptions
    logged and swallowed (as the ScriptRunner does); after the last image `before_process`
    and `process` of every script on `copy(p)`. `inner` keeps each inner job."""

    filename = "!adetailer.py"

    def __init__(self, web, stems=("dynamic_prompting",)):
        self.web, self.stems, self.inner = web, set(stems), []

    def title(self):
        return "ADetailer"

    def postprocess_image(self, p, pp, enabled=True, *args):
        if not enabled or getattr(p, "_ad_inner", False):
            return
        if p.batch_index == 0:
            p.scripts.postprocess(copy.copy(p), SimpleNamespace())
        from PIL import Image
        i2i = self.web.img2img(p.sd_model, (), init_images=[Image.new("RGB", (64, 64), (90, 40, 20))],
                               width=64, height=64, steps=2, denoising_strength=0.4)
        i2i.extra_generation_params = dict(p.extra_generation_params)
        i2i.scripts = p.scripts.filtered(self.stems)
        i2i.script_args = [copy.copy(a) for a in p.script_args]
        i2i._ad_disabled = i2i._ad_inner = True
        p2 = copy.copy(i2i)
        p2.image_mask = Image.new("L", (64, 64), 255)
        try:
            self.inner.append((p2, self.web.process_images(p2)))
        except Exception as e:
            self.web.logged.append(f"Error running postprocess_image: {type(e).__name__}: {e}")
        if p.batch_index == p.batch_size - 1:
            p.scripts.before_process(copy.copy(p))
            p.scripts.process(copy.copy(p))
