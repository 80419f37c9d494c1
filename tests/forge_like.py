"""Stand-ins for what the Forge host meets in the Forge WebUIs, written for these tests from
reading their public source (never copied): a `UnetPatcher` with the real method names and
its deep-copying `clone()`, a k-model whose `apply_model` takes σ, a UNet whose transformer
blocks apply `attn1_patch` / `attn1_replace` as Forge's do, and the CFG batch assembly
(one chunk of B rows per AND part and for the uncond, taken from the back, in several UNet
calls when memory is short).

WebUI level: processing objects for `a1111_like.MiniWebUI` (the same miniature WebUI and the
real script) that behave as the Forge flavours do around the script hooks:
  * "main" (Forge main, and Forge Neo up to its 2025-11 commits): the UNet objects are reset
    before each pass; in the hires pass `process_before_every_sampling` runs twice on the
    same sampler, the first time still on the first pass's UNet, then after a reset; Hires
    CFG (`hr_cfg`) is applied inside the denoiser, and 1 drops the uncond rows;
  * "neo" (Forge Neo 2026): in the hires pass `before_hr`, then the reset, then one hook; the
    patcher's `clone()` copies only dicts and lists (callables are shared, not deep-copied);
    the k-diffusion sampler writes the whole σ schedule into the active patcher's
    `transformer_options["sampling_sigmas"]` before it samples (so every attn1 patch sees
    it) and passes its `model_options` to the CFG denoiser on every call; UniPC is a
    k-diffusion sampler (`sample_unipc`) that calls the denoiser with a new
    tensor; a model loaded in parts is marked `model_lowvram` on the torch model;
  * "ersatz" (ersatzForge): in the hires pass the reset, then `before_hr`, then one hook;
  * "classic" (Forge Classic): one call per pass, no Hires CFG, and the first step of every
    pass runs without uncond rows (its `skip_early_cond` test is true at step 0);
  * "reforge": one call per pass, `extra_options` without `cond_indices` / `uncond_indices`."""

import contextlib
import copy
import functools
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import a1111_like
from a1111_like import rescale_zero_terminal_snr
from benchmarks import ldm


def _attention(q, k, v, heads):
    def split(t):
        return t.unflatten(-1, (heads, -1)).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).flatten(2)


class Block(ldm.BasicTransformerBlock):
    """attn1 as Forge runs it: patches see the normalised input, a replacement registered for
    (block name, block number, transformer index) gets q, k, v projected."""

    def self_attention(self, x, transformer_options=None):
        opts = transformer_options or {}
        attn = self.attn1
        extra = {k: v for k, v in opts.items() if k not in ("patches", "patches_replace")}
        extra.update(n_heads=attn.heads, dim_head=attn.to_q.out_features // attn.heads)
        n = self.norm1(x)
        keys = values = n
        for patch in opts.get("patches", {}).get("attn1_patch", ()):
            n, keys, values = patch(n, keys, values, extra)
        block = opts.get("block")
        key = (block[0], block[1], opts.get("block_index", 0)) if block else None
        replace = opts.get("patches_replace", {}).get("attn1", {}).get(key)
        q, k, v = attn.to_q(n), attn.to_k(keys), attn.to_v(values)
        out = replace(q, k, v, extra) if replace is not None else _attention(q, k, v, attn.heads)
        return attn.to_out(out)


def forge_unet(unet: ldm.LdmUNet) -> ldm.LdmUNet:
    """The same modules and weights, with Forge's way of calling attn1 (the UNet itself
    carries `transformer_options` and sets Forge's `block` keys)."""
    for m in unet.modules():
        if type(m) is ldm.BasicTransformerBlock:
            m.__class__ = Block
    return unet


class Prediction:
    """Forge's discrete VP predictor (backend/modules/k_prediction.py): the σ table, which
    Forge replaces for a zero-terminal-SNR run (`set_sigmas`), and the kind of model output."""

    def __init__(self, sigmas, prediction_type="epsilon"):
        self.sigmas, self.prediction_type = sigmas, prediction_type

    def set_sigmas(self, sigmas):
        self.sigmas = sigmas


class KModel(nn.Module):
    """k-diffusion form: σ in, x0 out; `predictor.sigmas` is the model's σ table."""

    def __init__(self, unet, sigmas, predictor=None):
        super().__init__()
        self.diffusion_model = unet
        self.predictor = predictor or Prediction(sigmas)
        self.control_log, self.control_warnings = [], []   # (latent hw, residual hw or None)

    def apply_model(self, x, t, c_crossattn=None, c_concat=None, control=None,
                    transformer_options=None, y=None, **kwargs):
        """ε or v from the UNet (in its own dtype, as Forge's computation dtype), x₀ out in
        the latent's dtype. ControlNet's residual as Forge's `apply_control` adds it: popped,
        added, printed and skipped on an error."""
        applied = None
        residual = control["input"].pop() if control and control.get("input") else None
        if residual is not None:
            try:
                x = x + residual
                applied = tuple(residual.shape[-2:])
            except RuntimeError:
                self.control_warnings.append(tuple(x.shape[-2:]))
        self.control_log.append((tuple(x.shape[-2:]), applied))
        sigma = t.float()[:, None, None, None]
        timestep = ldm.sigma_to_t(t, self.predictor.sigmas.log())
        dtype = next(self.diffusion_model.parameters()).dtype
        c_in = (sigma ** 2 + 1) ** -0.5
        out = self.diffusion_model(
            (x * c_in).to(dtype), timestep, None if c_crossattn is None else c_crossattn.to(dtype),
            None if y is None else y.to(dtype), transformer_options=transformer_options).to(x.dtype)
        if self.predictor.prediction_type == "v_prediction":
            return x * (1 / (sigma ** 2 + 1)) - out * (sigma * c_in)
        return x - sigma * out


class UnetPatcher:
    def __init__(self, model, load_device="cpu"):
        self.model = model
        self.load_device = torch.device(load_device)
        self.model_options = {"transformer_options": {}}
        self.extra_preserved_memory_during_sampling = 0
        self.controlnet_linked_list = None

    def clone(self):
        n = type(self)(self.model, self.load_device)
        n.model_options = self.copy_options(self.model_options)
        n.controlnet_linked_list = self.controlnet_linked_list
        n.extra_preserved_memory_during_sampling = self.extra_preserved_memory_during_sampling
        return n

    @staticmethod
    def copy_options(options):
        return copy.deepcopy(options)

    def set_model_patch(self, patch, name):
        patches = self.model_options["transformer_options"].setdefault("patches", {})
        patches[name] = patches.get(name, []) + [patch]

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        to = dict(self.model_options["transformer_options"])
        table = {k: dict(v) for k, v in to.get("patches_replace", {}).items()}
        key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        table.setdefault(name, {})[key] = patch
        to["patches_replace"] = table
        self.model_options["transformer_options"] = to

    def set_model_attn1_patch(self, patch):
        self.set_model_patch(patch, "attn1_patch")

    def set_model_attn1_replace(self, patch, block_name, number, transformer_index=None):
        self.set_model_patch_replace(patch, "attn1", block_name, number, transformer_index)

    def set_model_unet_function_wrapper(self, wrapper):
        self.model_options["model_function_wrapper"] = wrapper

    def add_extra_preserved_memory_during_sampling(self, memory_in_bytes):
        self.extra_preserved_memory_during_sampling += memory_in_bytes


def copy_dicts_and_lists(value):
    """Forge Neo's `backend.utils.deepcopy_`: dicts and lists are copied, every other value
    (functions, callable objects, tuples, tensors) is shared."""
    if isinstance(value, dict):
        return {k: copy_dicts_and_lists(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_dicts_and_lists(v) for v in value]
    return value


class NeoUnetPatcher(UnetPatcher):
    """Forge Neo 2026's patcher: `clone()` through `ModelPatcher.clone()`, whose option copy
    shares everything but dicts and lists."""

    copy_options = staticmethod(copy_dicts_and_lists)


def cond_uncond_batch(unet, parts, uncond, x, sigma, max_chunks=None, calls=None,
                      flavor="main"):
    """Mean of every AND part's prediction, and the uncond prediction (None without it).
    Chunks are taken from the back of [part 0, …, part n-1, uncond], `max_chunks` per call.
    The transformer options carry what the flavour's Forge puts there."""
    to_run = [(p, 0) for p in parts] + ([(uncond, 1)] if uncond is not None else [])
    out = {0: [], 1: []}
    while to_run:
        picked = list(reversed(range(len(to_run))))[:max_chunks or len(to_run)]
        batch = [to_run.pop(i) for i in picked]
        kinds = [k for _, k in batch]
        opts = dict(unet.model_options["transformer_options"], cond_or_uncond=kinds[:], sigmas=sigma)
        rows = [k for k in kinds for _ in range(x.shape[0])]
        if flavor == "reforge":
            opts["uuids"] = [0] * len(kinds)
        else:
            opts.update(cond_mark=[float(k) for k in rows],
                        cond_indices=[i for i, k in enumerate(rows) if k == 0],
                        uncond_indices=[i for i, k in enumerate(rows) if k == 1])
        args = {"input": torch.cat([x] * len(batch)), "timestep": torch.cat([sigma] * len(batch)),
                "c": {"c_crossattn": torch.cat([c for c, _ in batch]), "transformer_options": opts},
                "cond_or_uncond": kinds}
        control = getattr(unet, "controlnet_linked_list", None)
        if control is not None:   # before the wrapper, as Forge does
            args["c"]["control"] = control.get_control(args["input"], args["timestep"],
                                                       args["c"], len(kinds))
            args["c"]["control_model"] = control
        wrapper = unet.model_options.get("model_function_wrapper")
        if wrapper is not None:
            res = wrapper(unet.model.apply_model, args)
        else:
            res = unet.model.apply_model(args["input"], args["timestep"], **args["c"])
        if calls is not None:
            calls.append(kinds)
        for chunk, kind in zip(res.chunk(len(batch)), kinds):
            out[kind].append(chunk)
    cond = torch.stack(out[0]).mean(0)
    return cond, (torch.stack(out[1]).mean(0) if out[1] else None)


class CFGDenoiser(nn.Module):
    """`p.sampler.model_wrap_cfg`: reads the UNet from `sd_model.forge_objects` at every call.
    `timesteps`: the DDIM-style denoiser (t and a VP latent in, ε out; the UNet gets σ).
    `hr_cfg`: the scale used instead of the one passed (Forge's Hires CFG, applied inside);
    flavour "classic" runs its first step with scale 1 (no uncond rows)."""

    def __init__(self, sd_model, max_chunks=None, timesteps=False, flavor="main", hr_cfg=None):
        super().__init__()
        self.sd_model, self.max_chunks, self.timesteps = sd_model, max_chunks, timesteps
        self.flavor, self.hr_cfg = flavor, hr_cfg
        self.calls = []
        self.step = 0
        self.takes_model_options = False

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond=0.0, image_cond=None,
                **kwargs):
        if self.takes_model_options:   # Neo's k-diffusion samplers pass theirs on every call
            assert isinstance(kwargs.pop("model_options"), dict)
        assert not kwargs
        if self.hr_cfg is not None:
            cond_scale = self.hr_cfg
        if self.flavor == "classic" and self.step == 0:
            cond_scale = 1.0
        self.step += 1
        if self.timesteps:
            sig = self.sd_model.forge_objects.unet.model.predictor.sigmas
            sigma = sig[sigma.round().long()].to(x.dtype)
            x = x * (sigma ** 2 + 1).sqrt()[:, None, None, None]
        parts = [torch.stack([p[j] for p in cond.batch]) for j in range(len(cond.batch[0]))]
        c, u = cond_uncond_batch(self.sd_model.forge_objects.unet, parts,
                                 None if cond_scale == 1 else uncond, x, sigma,
                                 self.max_chunks, self.calls, self.flavor)
        unet = self.sd_model.forge_objects.unet
        cfg_fn = unet.model_options.get("sampler_cfg_function")
        if cfg_fn is not None and u is not None:
            den = x - cfg_fn({"cond": x - c, "uncond": x - u, "cond_scale": cond_scale,
                              "input": x, "sigma": sigma, "cond_denoised": c,
                              "uncond_denoised": u, "model": unet,
                              "model_options": unet.model_options})
        else:
            den = c if u is None else u + (c - u) * cond_scale
        for fn in unet.model_options.get("sampler_post_cfg_function", []):
            den = fn({"denoised": den, "cond": parts, "uncond": uncond, "model": unet,
                      "cond_denoised": c, "uncond_denoised": u, "sigma": sigma,
                      "model_options": unet.model_options, "input": x})
        if self.timesteps:
            return (x - den) / sigma[:, None, None, None]
        return den


def sd_model(unet, sigmas, kind="StableDiffusion", title="tiny.safetensors", patcher=UnetPatcher,
             predictor=None, **flags):
    """`p.sd_model` of a Forge WebUI: the patcher at `forge_objects.unet`, and the objects
    Forge resets it from before every pass."""
    model = type(kind, (SimpleNamespace,), {})(
        sd_checkpoint_info=SimpleNamespace(title=title), **flags)
    model.forge_objects_after_applying_lora = SimpleNamespace(
        unet=patcher(KModel(unet, sigmas, predictor)))
    model.forge_objects = copy.copy(model.forge_objects_after_applying_lora)
    return model


# ---- the WebUI ----------------------------------------------------------------------------
class Runner(a1111_like.Runner):
    """The hooks around a pass as the flavour's Forge runs them (see the module docstring)."""

    def before_hr(self, p):
        if p.flavor == "ersatz":     # ersatzForge resets the UNet objects before `before_hr`
            p.reset_forge_objects()
        super().before_hr(p)

    def process_before_every_sampling(self, p, **kw):
        hires = getattr(p, "is_hr_pass", False)
        if p.flavor == "main" and hires:
            self.hires_hook_calls += 1
            super().process_before_every_sampling(p, **kw)
        if not (p.flavor == "ersatz" and hires):
            p.reset_forge_objects()
        self.hires_hook_calls += hires
        super().process_before_every_sampling(p, **kw)

    hires_hook_calls = 0


def sample_unipc(cfg, x, sigmas, cond, uncond, scale=5.0, callback=None):
    """Forge Neo's UniPC, a k-diffusion sampler (first order here): it keeps its latent in VP
    form and calls the denoiser with a new tensor, input·√(σ²+1), so an edit of the
    denoiser's `x` never reaches its trajectory."""
    s_in = x.new_ones(x.shape[0])
    z = x / (sigmas[0] ** 2 + 1).sqrt()
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x_in = z * (s ** 2 + 1).sqrt()
        den = cfg(x_in, s * s_in, uncond=uncond, cond=cond, cond_scale=scale)
        eps = (x_in - den) / s
        a_next = 1 / (s_next ** 2 + 1)
        z = a_next.sqrt() * den + (1 - a_next).sqrt() * eps
        if callback is not None:
            callback({"x": z, "i": i, "denoised": den})
    return z


def with_model_options(func):
    """A sampler of Neo's vendored k-diffusion: every denoiser call carries the sampler's
    `model_options` (its `extra_args`), which Neo's CFG denoiser merges into the patcher's."""
    @functools.wraps(func)
    def sample(cfg, *args, **kwargs):
        return func(lambda *a, **k: cfg(*a, model_options={}, **k), *args, **kwargs)
    return sample


class KSampler(a1111_like.KDiffusionSampler):
    def __init__(self, funcname, model, p):
        self.func = {"euler": a1111_like.euler, "unipc": sample_unipc}[funcname]
        self.model_wrap_cfg = CFGDenoiser(model, **p.forge_cfg_kw())
        self.callbacks = 0
        if p.flavor == "neo":
            self.func = with_model_options(self.func)
            self.model_wrap_cfg.takes_model_options = True

    def _run(self, p, x, sig, c, uc):
        if p.flavor == "neo":   # Neo: the schedule into the patcher in place now
            p.sd_model.forge_objects.unet.model_options["transformer_options"]["sampling_sigmas"] = sig
        return super()._run(p, x, sig, c, uc)


class TimestepSampler(a1111_like.CompVisSampler):
    def __init__(self, funcname, model, p):
        self.func = {"ddim": a1111_like.ddim, "unipc": a1111_like.unipc}[funcname]
        self.model_wrap_cfg = CFGDenoiser(model, timesteps=True, **p.forge_cfg_kw())
        self.callbacks = 0


SAMPLERS = {"Euler": (KSampler, "euler"), "DDIM": (TimestepSampler, "ddim"),
            "UniPC": (TimestepSampler, "unipc")}
NEO_SAMPLERS = {**SAMPLERS, "UniPC": (KSampler, "unipc")}   # Neo: no timestep UniPC


class _Forge:
    """What the Forge flavours add to a1111_like's processing objects."""

    runner = Runner

    def _forge(self, web, args, flavor, hr_cfg, max_chunks):
        self.flavor, self.max_chunks = flavor, max_chunks
        self.hr_cfg = None if flavor == "classic" else hr_cfg

    def create_sampler(self, name):
        kind, func = (NEO_SAMPLERS if self.flavor == "neo" else SAMPLERS)[name]
        return kind(func, self.sd_model, self)

    def forge_cfg_kw(self):
        hires = getattr(self, "is_hr_pass", False)
        return dict(max_chunks=self.max_chunks, flavor=self.flavor,
                    hr_cfg=self.hr_cfg if hires else None)

    def model_table(self):
        sigmas = self.sd_model.forge_objects.unet.model.predictor.sigmas.double()
        return 1 / (1 + sigmas * sigmas)

    @contextlib.contextmanager
    def batch_schedule(self):
        """Forge's `process_images_inner` right before each `p.sample`: a ZTSNR model (its
        `ztsnr` key, or the setting) gets `predictor.set_sigmas(rescaled)`, undone after."""
        if not self.ztsnr:
            yield
            return
        predictor = self.sd_model.forge_objects_after_applying_lora.unet.model.predictor
        before = predictor.sigmas
        ac = rescale_zero_terminal_snr(1 / (1 + before * before))   # float32, as Forge
        predictor.set_sigmas(((1 - ac) / ac).sqrt())
        try:
            yield
        finally:
            predictor.set_sigmas(before)

    def reset_forge_objects(self):
        self.sd_model.forge_objects = copy.copy(self.sd_model.forge_objects_after_applying_lora)


class Txt2Img(_Forge, a1111_like.Txt2Img):
    def __init__(self, web, model, args, flavor="main", hr_cfg=None, max_chunks=None, **kw):
        super().__init__(web, model, args, **kw)
        self._forge(web, args, flavor, hr_cfg, max_chunks)


class Img2Img(_Forge, a1111_like.Img2Img):
    def __init__(self, web, model, args, flavor="main", max_chunks=None, **kw):
        super().__init__(web, model, args, **kw)
        self._forge(web, args, flavor, None, max_chunks)


# ---- Forge's integrated extensions ---------------------------------------------------------
class PostCfgBatchLike:
    """SelfAttentionGuidance / PerturbedAttentionGuidance Integrated as FAM meets them: a
    post-CFG function that runs one more UNet batch after the step's CFG, SAG with its
    uncond prompt handed over as a cond on a changed latent, PAG with the cond prompt, and
    mixes it in. `batches` logs the σ of each extra batch."""

    def __init__(self, kind):
        self.kind, self.batches = kind, []

    def title(self):
        return {"sag": "SelfAttentionGuidance Integrated (SD 1.x, SD 2.x, SDXL)",
                "pag": "PerturbedAttentionGuidance Integrated"}[self.kind]

    def process_before_every_sampling(self, p, enabled=False, *args, **kwargs):
        if not enabled:
            return
        unet = p.sd_model.forge_objects.unet.clone()

        def post_cfg(args):
            self.batches.append(float(args["sigma"][0]))
            if self.kind == "sag":
                prompts, x = [args["uncond"]], args["input"] * 0.9
                base = args["uncond_denoised"]
            else:
                prompts, x = args["cond"], args["input"]
                base = args["cond_denoised"]
            extra, _ = cond_uncond_batch(args["model"], prompts, None, x, args["sigma"])
            return args["denoised"] + 0.3 * (base - extra)

        unet.model_options["sampler_post_cfg_function"] = (
            unet.model_options.get("sampler_post_cfg_function", []) + [post_cfg])
        p.sd_model.forge_objects.unet = unet


class CfgFunctionLike:
    """DynamicThresholding / LatentModifier Integrated: a `sampler_cfg_function` that
    replaces the CFG mix (here: the mix with its result clamped, as a threshold does)."""

    def __init__(self):
        self.calls = 0

    def title(self):
        return "DynamicThresholding (CFG-Fix) Integrated"

    def process_before_every_sampling(self, p, enabled=False, *args, **kwargs):
        if not enabled:
            return
        unet = p.sd_model.forge_objects.unet.clone()

        def cfg_function(args):
            self.calls += 1
            mixed = args["uncond"] + (args["cond"] - args["uncond"]) * args["cond_scale"]
            return mixed.clamp(-1.5, 1.5)

        unet.model_options["sampler_cfg_function"] = cfg_function
        p.sd_model.forge_objects.unet = unet


class IntegratedLike:
    """An integrated extension known by its title and on/off switch only."""

    def __init__(self, title):
        self._title = title

    def title(self):
        return self._title


class ControlNodeLike:
    """One unit of Forge's ControlNet linked list (`backend/patcher/controlnet.py`):
    `get_control` resizes the hint to the call's latent itself (nearest-exact, kept in
    `cond_hint` until the size changes, `resizes` counts it) and returns fresh residual
    lists, here one residual made from the hint, merged with the previous unit's."""

    def __init__(self, hint, weight=0.3, previous=None):
        self.cond_hint_original, self.cond_hint = hint, None
        self.weight, self.previous_controlnet = weight, previous
        self.resizes = 0

    def get_control(self, x, t, cond, batched_number):
        prev = (self.previous_controlnet.get_control(x, t, cond, batched_number)
                if self.previous_controlnet is not None else None)
        size = (x.shape[2] * 8, x.shape[3] * 8)
        if self.cond_hint is None or tuple(self.cond_hint.shape[-2:]) != size:
            self.resizes += 1
            self.cond_hint = torch.nn.functional.interpolate(self.cond_hint_original, size=size,
                                                             mode="nearest-exact")
        residual = self.weight * torch.nn.functional.avg_pool2d(self.cond_hint, 8).mean(1, keepdim=True)
        if prev is not None:
            residual = residual + prev["input"][0]
        return {"input": [residual.to(x.dtype)], "middle": [], "output": []}


class ControlNetForgeLike:
    """Forge's built-in ControlNet script: per pass, a UNet clone with one linked-list unit
    per enabled unit, the hint at the pass's size (the high-res hint in the Hires. fix
    pass; the img2img input for a unit without an image)."""

    def title(self):
        return "ControlNet"

    def process_before_every_sampling(self, p, *units, **kwargs):
        head = None
        for unit in units:
            if not unit.get("enabled"):
                continue
            hires = getattr(p, "is_hr_pass", False)
            w, h = ((p.hr_upscale_to_x, p.hr_upscale_to_y) if hires else (p.width, p.height))
            image = unit.get("image") or p.init_images[0]
            hint = a1111_like._pixels(image, w, h)
            head = ControlNodeLike(hint, unit.get("weight", 0.3), head)
        if head is None:
            return
        unet = p.sd_model.forge_objects.unet.clone()
        unet.controlnet_linked_list = head
        p.sd_model.forge_objects.unet = unet


class PatchModelAddDownscale:
    """Named as Kohya HRFix's patch class is (its functions' qualified names start so)."""

    @staticmethod
    def patch():
        def input_block_patch(h, transformer_options):
            return h
        return input_block_patch


class StyleAlignForForge:
    """Named as StyleAlign's script class is."""

    @staticmethod
    def process_before_every_sampling():
        def attn1_proc(q, k, v, transformer_options):
            return q
        return attn1_proc


class PatchingLike:
    """An integrated extension under a fork's own title that patches the UNet as the named
    one does: "multidiffusion" (its flag), "kohya" (an input block patch), "stylealign"
    (attn1 replacements)."""

    def __init__(self, kind):
        self.kind = kind

    def title(self):
        return f"Renamed {self.kind}"

    def process_before_every_sampling(self, p, enabled=False, *args, **kwargs):
        if not enabled:
            return
        unet = p.sd_model.forge_objects.unet.clone()
        if self.kind == "multidiffusion":
            unet.model_options["tiled_diffusion"] = True
        elif self.kind == "kohya":
            unet.set_model_patch(PatchModelAddDownscale.patch(), "input_block_patch")
        else:
            unet.set_model_attn1_replace(StyleAlignForForge.process_before_every_sampling(),
                                         "output", 3, 0)
        p.sd_model.forge_objects.unet = unet
