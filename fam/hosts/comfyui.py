"""ComfyUI host: FAM on the `ModelPatcher` a node is given, with ComfyUI's own sampling.

A FAM node runs its passes itself through `comfy.sample.sample` (the KSampler path), each on
a clone of the user's MODEL carrying FAM's functions: the patcher dialect of `PatcherHooks`
(attn1 patch, attn1 replacements on the AM layers, the UNet function wrapper) and two of
ComfyUI's model wrappers —
  * PREDICT_NOISE gets the sampler's own latent before every model evaluation: FM edits it
    there, in place, and the conds of the run give each UNet batch its row roles and its
    ControlNet object (by cond uuid);
  * SAMPLER_SAMPLE gives UniPC, whose corrector rebuilds its latent from copies, a callback
    through which FM edits the latent its next step starts from.
The user's MODEL is never changed; the clones die with the call and a `finally` drops the
run. No ComfyUI import at module level: CI runs this module with stand-ins."""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from ..guidance import HIRES, FamRun
from ..layers import AttnLayer, LayerSelectionError, UNetLayout, discover
from ..params import FamParams
from ..record import Role
from ..schedule import VPSchedule
from .patcher import Attention, PatcherHooks, _Inputs, _through, control_residuals
from .sdxl import native_size_vector
from .unet_hooks import LATENT_FACTOR, NativeCall, Reference, _Current

__all__ = ["FamComfyError", "ModelKind", "Sampling", "ComfyHooks", "ComfyGeneration",
           "model_kind", "check_sampler", "hires_size", "hires_fix", "hires_pass",
           "REFUSED_SAMPLERS", "CALLBACK_SAMPLERS"]

log = logging.getLogger("fam")

WRAPPER_KEY = "fam_diffusion"
MAX_SIDE = 16384   # pixels: the largest side ComfyUI's own latent nodes make (MAX_RESOLUTION)

# Samplers whose state FM's in-place edit cannot reach, with why (refused by name).
REFUSED_SAMPLERS = {
    "sa_solver": "its corrector rebuilds each latent from the previous one, so FM's edit of "
                 "the evaluated latent never reaches the sampler's state (sa_solver_pece "
                 "evaluates the corrected latent and works)",
}
# Samplers that rebuild their latent in a corrector from copies and hand the rebuilt one (in
# VP units) to the progress callback: FM edits it there too.
CALLBACK_SAMPLERS = frozenset({"uni_pc", "uni_pc_bh2"})

_UNET_FAMILIES = {"SD15": "SD1.x", "SD20": "SD2.x", "SDXL": "SDXL", "SSD1B": "SSD-1B (SDXL)",
                  "Segmind_Vega": "Segmind Vega (SDXL)", "KOALA_700M": "KOALA 700M (SDXL)",
                  "KOALA_1B": "KOALA 1B (SDXL)"}
_UNET_CLASSES = ("BaseModel", "SDXL")
_OTHER_UNETS = {   # config class: (family, what it is)
    "SDXLRefiner": ("SDXL Refiner", "is a refiner: use FAM with the SDXL base model"),
    "SD21UnclipL": ("SD2.1 unCLIP", "is an image-variation model"),
    "SD21UnclipH": ("SD2.1 unCLIP", "is an image-variation model"),
    "SD15_instructpix2pix": ("SD1.5 instruct-pix2pix", "is an image-editing model"),
    "SDXL_instructpix2pix": ("SDXL instruct-pix2pix", "is an image-editing model"),
    "SD_X4Upscaler": ("SD x4 upscaler", "is an upscaler model"),
    "Stable_Zero123": ("Stable Zero123", "is a novel-view model"),
    "SVD_img2vid": ("Stable Video Diffusion", "is a video model"),
    "SV3D_u": ("SV3D", "is a video model"), "SV3D_p": ("SV3D", "is a video model"),
    "LotusD": ("Lotus", "is a depth/normal estimation model"),
}
_FAMILIES = {"Flux": "Flux.1", "FluxSchnell": "Flux.1", "FluxInpaint": "Flux.1", "Flux2": "Flux.2",
             "SD3": "SD3", "AuraFlow": "AuraFlow", "HunyuanDiT": "Hunyuan-DiT",
             "HunyuanDiT1": "Hunyuan-DiT", "PixArtAlpha": "PixArt-α", "PixArtSigma": "PixArt-Σ",
             "Stable_Cascade_C": "Stable Cascade", "Stable_Cascade_B": "Stable Cascade",
             "Chroma": "Chroma", "ChromaRadiance": "Chroma Radiance", "Lumina2": "Lumina 2",
             "ZImage": "Z-Image", "QwenImage": "Qwen-Image", "HiDream": "HiDream"}
_SAMPLING_GENERIC = {"Module", "object", "Protocol", "Generic", "ModelSampling",
                     "ModelSamplingAdvanced"}
_SAMPLING_OK = ({"ModelSamplingDiscrete", "EPS"}, {"ModelSamplingDiscrete", "EPS", "V_PREDICTION"})


class FamComfyError(ValueError):
    """A FAM node cannot run what it was given; the message names the input."""


class ModelKind(NamedTuple):
    family: str              # "SD1.x", "SD2.x", "SDXL", …
    layout: UNetLayout
    schedule: VPSchedule
    sdxl: bool               # SDXL's size conditioning (`y`) must say the size of a call


def _needs_unet(family: str, what: str) -> FamComfyError:
    return FamComfyError(f"FAM Diffusion needs an SD1.x/SD2.x/SDXL UNet model; {family} {what} "
                         "(input 'model')")


def model_kind(patcher: Any) -> ModelKind:
    """Accept only an SD1.x/SD2.x/SDXL UNet (decided by its classes and layout, so anything
    new is refused) on a discrete ε or v noise schedule (ModelSamplingDiscrete, also as set by
    a ModelSampling node: v-prediction, zero-terminal SNR); refuse everything else naming the
    model family."""
    base = getattr(patcher, "model", None)
    config = type(getattr(base, "model_config", None)).__name__
    net = getattr(base, "diffusion_model", None)
    family, what = _OTHER_UNETS.get(config, (_UNET_FAMILIES.get(config) or
                                             _FAMILIES.get(config, config), None))
    try:
        layout = discover(net)
    except LayerSelectionError:
        layout = None
    if layout is None or layout.naming != "ldm":
        kind = "UNet" if "unet" in type(net).__name__.lower() else "transformer"
        raise _needs_unet(family, f"is a {kind} model" if kind == "transformer"
                          else "is a UNet of another layout")
    if what is not None:
        raise _needs_unet(family, what)
    c_in, c_out = getattr(net, "in_channels", 4), getattr(net, "out_channels", 4)
    if c_out != 4:
        raise _needs_unet(family, f"uses a {c_out}-channel latent")
    if c_in not in (4, 9):
        raise _needs_unet(family, f"is an image-conditioned UNet ({c_in} input channels)")
    if config not in _UNET_FAMILIES or type(base).__name__ not in _UNET_CLASSES:
        raise _needs_unet(family, f"is another kind of model ({type(base).__name__})")
    if not hasattr(patcher, "add_wrapper_with_key"):
        raise FamComfyError("FAM Diffusion needs a ComfyUI with model wrappers (2025 or newer)")
    sampling = patcher.get_model_object("model_sampling")
    names = [c.__name__ for c in type(sampling).__mro__ if c.__name__ not in _SAMPLING_GENERIC]
    if set(names) not in _SAMPLING_OK:
        schedule = next((n for n in names if n.startswith("ModelSampling")), type(sampling).__name__)
        kind = next((n for n in names if not n.startswith("ModelSampling")), "?")
        flow = ", flow matching" if kind == "CONST" else ""
        raise FamComfyError(
            f"FAM Diffusion needs a discrete ε- or v-prediction noise schedule; this {family} "
            f"model samples with {schedule} ({kind}{flow}), from the checkpoint or a "
            "ModelSampling node (input 'model')")
    sigmas = sampling.sigmas.detach().double().cpu()
    return ModelKind(family, layout, VPSchedule(1.0 / (1.0 + sigmas * sigmas)),
                     type(base).__name__ == "SDXL")


def check_sampler(name: str) -> None:
    if name in REFUSED_SAMPLERS:
        raise FamComfyError(f"FAM Diffusion cannot guide sampler '{name}': "
                            f"{REFUSED_SAMPLERS[name]} (input 'sampler_name')")


def hires_size(latent_hw: Sequence[int], scale: float) -> tuple[int, int]:
    """The high-res latent size for `scale`, rounded as ComfyUI's Upscale Latent By rounds."""
    if not 1.5 <= scale <= 4:
        raise FamComfyError(f"FAM Diffusion scales by 1.5 to 4; got {scale} (input 'scale')")
    hw = tuple(round(n * scale) for n in latent_hw)
    if max(hw) * LATENT_FACTOR > MAX_SIDE:
        raise FamComfyError(
            f"FAM Diffusion: scale {scale} makes a {hw[1] * LATENT_FACTOR}x"
            f"{hw[0] * LATENT_FACTOR} image, larger than ComfyUI's {MAX_SIDE} px (input 'scale')")
    return hw


def comfy_attention(layers: Sequence[AttnLayer]) -> Attention:
    """The attention ComfyUI itself runs (its current choice, looked up per call) with the
    model's attention precision, for the AM layers' calls FAM does not modulate."""
    precision = getattr(layers[0].module, "attn_precision", None) if layers else None

    def attention(q, k, v, heads):
        from comfy.ldm.modules import attention as comfy_attention_module
        return comfy_attention_module.optimized_attention(q, k, v, heads, attn_precision=precision)
    return attention


class ComfyHooks(PatcherHooks):
    """`PatcherHooks` with ComfyUI's model wrappers. Row roles come from the cond uuids of
    each UNet batch: the part of a role is the cond's place in its list (positive or
    negative), the same in both passes whatever ComfyUI batches, splits or skips; ControlNet
    residuals of native-size calls are made by the batch's own ControlNet object. UNet calls
    on part of the latent (area conditioning) pass through untouched."""

    def __init__(self, run: FamRun, layers: Sequence[AttnLayer], attention: Attention,
                 native_vector: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None):
        super().__init__(run, layers, attention, native_vector, host="ComfyUI")
        self.latent_hw: tuple[int, int] | None = None   # this pass's latent size
        self.state_callback = False      # the high-res sampler is one of CALLBACK_SAMPLERS
        self.area_calls = 0
        self._conds: Any = None
        self._parts: dict[Any, int] = {}
        self._controls: dict[Any, Any] = {}

    def patched(self, unet: Any) -> Any:
        """A clone of `unet` for this pass: the patcher dialect when AM runs, the wrappers
        FM and the row roles need always."""
        from comfy.patcher_extension import WrappersMP
        unet = super().patched(unet) if self.run.params.am_active else unet.clone()
        unet.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, WRAPPER_KEY, self._predict_noise())
        if self.run.phase == HIRES and self.state_callback:
            unet.add_wrapper_with_key(WrappersMP.SAMPLER_SAMPLE, WRAPPER_KEY,
                                      self._sampler_sample())
        return unet

    def remove(self) -> None:
        super().remove()
        self._conds, self._parts, self._controls = None, {}, {}

    def report(self) -> dict[str, str]:
        out = super().report()
        if self.area_calls and self.run.params.am_active:
            out["FAM area calls"] = (f"{self.area_calls} UNet calls on part of the latent "
                                     "(area conditioning) ran without AM")
        return out

    # ---- ComfyUI's wrappers -------------------------------------------------------------
    def _predict_noise(self):
        def predict_noise(executor, x, timestep, *args, **kwargs):
            self._follow(getattr(executor, "class_obj", None))
            self.begin_step()
            if self.run.phase == HIRES:
                self.run.guide_latent(x, float(timestep.flatten()[0]))
            return executor(x, timestep, *args, **kwargs)
        return predict_noise

    def _sampler_sample(self):
        def sampler_sample(executor, guider, sigmas, extra_args, callback, *args, **kwargs):
            return executor(guider, sigmas, extra_args, self._guided_callback(callback, sigmas),
                            *args, **kwargs)
        return sampler_sample

    def _guided_callback(self, callback, sigmas: torch.Tensor):
        """UniPC's callback after step i holds the latent at sigmas[i] (VP units) that step
        i + 1 starts from; after the last step, the finished latent (left alone)."""
        last = len(sigmas) - 2

        def guided(step, x0, x, total_steps):
            if step < last and isinstance(x, torch.Tensor):
                sigma = float(sigmas[step])
                scale = math.sqrt(1.0 + sigma * sigma)
                z = x * scale
                before = z.clone()
                self.run.guide_latent(z, sigma)
                x.add_(z.sub_(before).div_(scale))
            if callback is not None:
                return callback(step, x0, x, total_steps)
        return guided

    def _follow(self, guider: Any) -> None:
        """The conds of this sampling run: each cond's place in its list and its ControlNet."""
        conds = getattr(guider, "conds", None)
        if conds is self._conds:
            return
        self._conds, self._parts, self._controls = conds, {}, {}
        for entries in (conds or {}).values():
            for i, cond in enumerate(entries or ()):
                if isinstance(cond, Mapping) and "uuid" in cond:
                    self._parts[cond["uuid"]] = i
                    self._controls[cond["uuid"]] = cond.get("control")

    # ---- per UNet batch -----------------------------------------------------------------
    def _unet_call(self, inputs: _Inputs):
        args = inputs.args
        if self.latent_hw is not None and tuple(args["input"].shape[-2:]) != self.latent_hw:
            self.area_calls += 1
            return _through(inputs.previous, inputs.apply_model, args)
        uuids = _uuids(args)
        control = self._controls.get(uuids[0]) if uuids else None
        return super()._unet_call(inputs._replace(control=control))

    def _roles(self, args: Mapping[str, Any], rows: int) -> list[Role]:
        kinds, uuids = tuple(args.get("cond_or_uncond") or ()), _uuids(args)
        if (not kinds or len(uuids) != len(kinds) or rows % len(kinds)
                or not all(u in self._parts for u in uuids)):
            return super()._roles(args, rows)
        b, roles = rows // len(kinds), []
        for kind, uuid in zip(kinds, uuids):
            if kind not in (0, 1):
                return []
            roles += [Role(i, kind == 1, self._parts[uuid]) for i in range(b)]
        return roles

    def _native_kwargs(self, inputs: _Inputs, z: torch.Tensor) -> dict:
        kwargs = super()._native_kwargs(inputs, z)
        if inputs.control is not None:
            kwargs["control"] = self._residuals(inputs.control, z, inputs.args, kwargs)
        return kwargs

    def _replay_native(self, call: NativeCall, current: _Current) -> None:
        """The recorded call again; its ControlNet residuals were consumed by the UNet, so
        they are made again."""
        inputs, args = call.inputs, call.inputs.args
        if inputs.control is not None:
            c = dict(args["c"], transformer_options=dict(args["c"].get("transformer_options") or {}))
            c["control"] = self._residuals(inputs.control, args["input"], args, c)
            args = {**args, "c": c}
        self.inside(_through, inputs.previous, current.inputs.apply_model, args)

    @staticmethod
    def _residuals(control: Any, x: torch.Tensor, args: Mapping[str, Any], c: dict):
        """ControlNet residuals for latent x (the rows of the batch `args`)."""
        chunks = len(args.get("cond_or_uncond") or ()) or 1
        return control_residuals(control, x, args["timestep"], c, chunks)


def _uuids(args: Mapping[str, Any]) -> tuple:
    options = (args.get("c") or {}).get("transformer_options") or {}
    return tuple(options.get("uuids") or ())


class Sampling(NamedTuple):
    """What both passes of a node share, as ComfyUI's KSampler takes it."""
    positive: Any
    negative: Any
    seed: int
    cfg: float
    sampler_name: str
    scheduler: str


class _Progress:
    """One ComfyUI progress bar (with previews) over both passes of a node."""

    def __init__(self, model: Any, total: int):
        import latent_preview
        self.total, self.done = total, 0
        self._callback = latent_preview.prepare_callback(model, total)

    def next_pass(self, steps: int):
        offset, self.done = self.done, self.done + steps

        def callback(step, x0, x, total_steps):
            self._callback(offset + step, x0, x, self.total)
        return callback


def _noised(model, latent: Mapping, samples: torch.Tensor, seed: int):
    """The pass's start latent and noise exactly as ComfyUI's KSampler node makes them (the
    same noise for the same seed, size and batch index)."""
    import comfy.sample
    image = comfy.sample.fix_empty_latent_channels(model, samples)
    return image, comfy.sample.prepare_noise(image, seed, latent.get("batch_index"))


def _sample(model, image: torch.Tensor, noise: torch.Tensor, sampling: Sampling, steps: int,
            denoise: float, callback) -> torch.Tensor:
    import comfy.sample
    import comfy.utils
    return comfy.sample.sample(
        model, noise, steps, sampling.cfg, sampling.sampler_name, sampling.scheduler,
        sampling.positive, sampling.negative, image, denoise=denoise, callback=callback,
        disable_pbar=not getattr(comfy.utils, "PROGRESS_BAR_ENABLED", True), seed=sampling.seed)


def _upsample(samples: torch.Tensor, hw: Sequence[int]) -> torch.Tensor:
    """z̃₀: bicubic in one jump (docs/method.md §1 step 2), as Upscale Latent By (bicubic)."""
    return F.interpolate(samples.float(), size=tuple(hw), mode="bicubic", align_corners=False)


class ComfyGeneration:
    """FAM for one node execution on `model`: its run, its hooks, one clone per pass."""

    def __init__(self, model: Any, params: FamParams):
        self.model, self.params = model, params
        self.kind = model_kind(model)
        try:
            layers = self.kind.layout.am_layers(params.am_block_indices, model_name=self.kind.family)
        except LayerSelectionError as e:
            raise FamComfyError(f"{e} (input 'am_blocks')") from e
        self.run = FamRun(params, layers, self.kind.schedule)
        vector = None
        if self.kind.sdxl:
            embedder = model.model.embedder
            vector = lambda y, h, w: native_size_vector(embedder, y, h, w)   # noqa: E731
        self.hooks = ComfyHooks(self.run, layers, comfy_attention(layers), vector)

    def record_native(self, latent_hw: Sequence[int]) -> Any:
        """The model for the native pass: it records what AM needs (plain without AM)."""
        self.run.begin_native()
        if not self.params.am_active:
            return self.model
        self.hooks.latent_hw = tuple(latent_hw)
        return self.hooks.patched(self.model)

    def guide_hires(self, z0: torch.Tensor, noise: torch.Tensor, sampler_name: str,
                    native: torch.Tensor, recorded: bool) -> Any:
        """The model for the high-res pass from z0 (the upsampled native latent) with the
        pass's noise, both as the graph holds them. `native`: the clean native latent; when
        no native pass was `recorded`, AM's native maps come from re-noising it to each σ."""
        device, fmt = self.model.load_device, self.model.get_model_object("latent_format")
        z0 = fmt.process_in(z0.to(device, torch.float32))
        noise = noise.to(device, torch.float32)
        reference_hw = None
        if not (recorded and self.params.am_active):   # FM still needs the native size
            reference_hw = tuple(native.shape[-2:])
        if not recorded and self.params.am_active:
            self.hooks.reference = Reference(fmt.process_in(native.to(device, torch.float32)),
                                             noise)
        self.hooks.latent_hw = tuple(z0.shape[-2:])
        self.hooks.state_callback = sampler_name in CALLBACK_SAMPLERS
        self.run.begin_hires(z0, noise, vp=False, replay_fn=self.hooks.replay,
                             replay_can_stop=True, reference_native_hw=reference_hw)
        return self.hooks.patched(self.model)

    def close(self) -> None:
        """Everything off; safe to call twice."""
        self.hooks.remove()
        self.run.end()

    def report(self) -> dict[str, str]:
        return {**self.run.report(), **self.hooks.report()}


def _checked(latent: Any, name: str) -> torch.Tensor:
    samples = latent.get("samples") if isinstance(latent, Mapping) else None
    if not isinstance(samples, torch.Tensor) or samples.is_nested or samples.ndim != 4:
        raise FamComfyError("FAM Diffusion needs an image latent (batch, channels, height, "
                            f"width) (input '{name}')")
    if latent.get("noise_mask") is not None:
        raise FamComfyError(
            "FAM Diffusion upscales whole images and does not inpaint: the latent has a noise "
            f"mask (Set Latent Noise Mask, VAE Encode for Inpainting) (input '{name}')")
    return samples


def _hires(model, gen: ComfyGeneration | None, latent: Mapping, native: torch.Tensor,
           hw: tuple[int, int], sampling: Sampling, steps: int, denoise: float, callback,
           recorded: bool) -> torch.Tensor:
    image, noise = _noised(model, latent, _upsample(native, hw), sampling.seed)
    if gen is None:
        return _sample(model, image, noise, sampling, steps, denoise, callback)
    hires = gen.guide_hires(image, noise, sampling.sampler_name, native, recorded)
    if gen.params.full_renoise:
        denoise = 1.0
    samples = _sample(hires, image, noise, sampling, steps, denoise, callback)
    for key, value in gen.report().items():
        log.warning("%s: %s", key, value)
    return samples


def _out(latent: Mapping, samples: torch.Tensor) -> dict:
    out = {k: v for k, v in latent.items() if k not in ("samples", "noise_mask")}
    out["samples"] = samples
    return out


def hires_fix(model, latent: dict, sampling: Sampling, steps: int, denoise: float, scale: float,
              hires_steps: int, hires_denoise: float, params: FamParams) -> tuple[dict, dict]:
    """FAM Hires Sampler: the native pass on `latent` (recorded), then the FAM pass at
    `scale` from its bicubic upsampling, fully re-noised (`full_renoise`) or at
    `hires_denoise`; with FAM off, the plain two-KSampler Hires fix with the same seeds.
    Returns (high-res latent, native latent)."""
    check_sampler(sampling.sampler_name)
    samples = _checked(latent, "latent_image")
    hw = hires_size(samples.shape[-2:], scale)
    hires_steps = hires_steps or steps
    gen = ComfyGeneration(model, params) if params.enabled else None
    progress = _Progress(model, steps + hires_steps)
    try:
        native_model = gen.record_native(samples.shape[-2:]) if gen else model
        image, noise = _noised(model, latent, samples, sampling.seed)
        native = _sample(native_model, image, noise, sampling, steps, denoise,
                         progress.next_pass(steps))
        hires = _hires(model, gen, latent, native, hw, sampling, hires_steps, hires_denoise,
                       progress.next_pass(hires_steps), recorded=True)
        return _out(latent, hires), _out(latent, native)
    finally:
        if gen is not None:
            gen.close()


def hires_pass(model, latent: dict, sampling: Sampling, steps: int, scale: float, denoise: float,
               params: FamParams) -> dict:
    """FAM Hires Pass: the FAM pass at `scale` over any native latent (a first KSampler's
    output, an encoded image); the native attention comes from that latent re-noised to each
    σ (the reference path: one extra native-size UNet call per step)."""
    check_sampler(sampling.sampler_name)
    samples = _checked(latent, "latent")
    hw = hires_size(samples.shape[-2:], scale)
    gen = ComfyGeneration(model, params) if params.enabled else None
    progress = _Progress(model, steps)
    try:
        hires = _hires(model, gen, latent, samples, hw, sampling, steps, denoise,
                       progress.next_pass(steps), recorded=False)
        return _out(latent, hires)
    finally:
        if gen is not None:
            gen.close()


