"""The FAM nodes of ComfyUI: inputs, outputs and tooltips, each node delegating at once to
`fam.hosts.comfyui`. Classic node API (`NODE_CLASS_MAPPINGS`): every ComfyUI loads it, and
its input validation is the same as the typed API's.

Imported by the repository's root `__init__.py` when ComfyUI loads the folder: nothing
heavy, nothing from ComfyUI at import time (the sampler lists are read when ComfyUI asks for
the inputs, the engine is imported when a node runs)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..params import FamParamError, FamParams

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "FAM_SETTINGS"]

CATEGORY = "sampling/FAM Diffusion"
FAM_SETTINGS = "FAM_SETTINGS"   # the link type of a FamParams
_SEED_MAX = 0xFFFFFFFFFFFFFFFF


def fam_inputs() -> dict[str, tuple]:
    """One widget per FAM setting: the WebUI API's names, defaults, ranges and texts (from
    `FamParams`), except that `enabled` starts on (the node is there to run FAM)."""
    out = {}
    for f in dataclasses.fields(FamParams):
        meta = f.metadata
        tip = f"{meta['label']}: {meta['doc']}"
        if f.name == "enabled":
            out[f.name] = ("BOOLEAN", {"default": True, "tooltip": (
                f"{tip} Off: a plain Hires fix with the same seeds, for comparison.")})
        elif f.type in ("bool", bool):
            out[f.name] = ("BOOLEAN", {"default": f.default, "tooltip": tip})
        elif f.type in ("str", str):
            out[f.name] = ("STRING", {"default": f.default, "multiline": False, "tooltip": tip})
        else:
            out[f.name] = ("INT" if f.type in ("int", int) else "FLOAT", {
                "default": f.default, "min": meta["minimum"], "max": meta["maximum"],
                "step": meta["step"], "tooltip": tip})
    return out


def _samplers() -> tuple[list[str], list[str]]:
    import comfy.samplers
    from .comfyui import REFUSED_SAMPLERS
    names = [s for s in comfy.samplers.KSampler.SAMPLERS if s not in REFUSED_SAMPLERS]
    return names, list(comfy.samplers.KSampler.SCHEDULERS)


def _pass_inputs(latent: str, latent_tip: str) -> dict[str, tuple]:
    samplers, schedulers = _samplers()
    return {
        "model": ("MODEL", {"tooltip": "An SD1.x, SD2.x or SDXL model (with its LoRAs and "
                                       "ModelSampling nodes)."}),
        "positive": ("CONDITIONING", {"tooltip": "The prompt (ControlNet and combined "
                                                 "conditioning work as with KSampler)."}),
        "negative": ("CONDITIONING", {"tooltip": "The negative prompt."}),
        latent: ("LATENT", {"tooltip": latent_tip}),
        "seed": ("INT", {"default": 0, "min": 0, "max": _SEED_MAX, "control_after_generate": True,
                         "tooltip": "Noise seed: each pass draws its noise as a KSampler with "
                                    "this seed would."}),
        "steps": ("INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Sampling steps."}),
        "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                          "tooltip": "Classifier-free guidance scale."}),
        "sampler_name": (samplers, {"tooltip": "Every ComfyUI sampler FM can guide (all but "
                                               "sa_solver, whose corrector never sees FM's "
                                               "latent)."}),
        "scheduler": (schedulers, {"tooltip": "The noise schedule of the steps."}),
        "scale": ("FLOAT", {"default": 2.0, "min": 1.5, "max": 4.0, "step": 0.05, "tooltip": (
            "Upscale factor of the high-res pass; the latent size is rounded as Upscale Latent "
            "By rounds.")}),
    }


_OPTIONAL = {"optional": {FAM_SETTINGS.lower(): (FAM_SETTINGS, {"tooltip": (
    "Settings from a FAM Settings node; when linked they replace this node's FAM widgets.")})}}


def params_from(values: dict[str, Any], settings: Any = None) -> FamParams:
    """The FAM settings of a node: a linked FAM Settings node's, else its own widgets."""
    if settings is not None:
        if not isinstance(settings, FamParams):
            raise FamParamError("fam_settings", type(settings).__name__,
                                "link the output of a FAM Settings node")
        return settings
    return FamParams(**{name: values[name] for name in FamParams.names()})


def _check_blocks(am_blocks: Any) -> bool | str:
    """ComfyUI's validation of the one FAM setting it cannot range-check itself. Named alone
    in VALIDATE_INPUTS: ComfyUI skips its own checks of every input named there."""
    if am_blocks is None:   # linked: checked when the node runs
        return True
    try:
        FamParams(am_blocks=am_blocks)
    except FamParamError as e:
        return str(e)
    return True


class FAMHiresSampler:
    DESCRIPTION = ("FAM Diffusion's Hires fix in one node: the native pass (recorded), then "
                   "the high-res pass from its upsampled latent, guided by Frequency and "
                   "Attention Modulation so it keeps the native image's layout.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT", "LATENT")
    RETURN_NAMES = ("hires", "native")
    OUTPUT_TOOLTIPS = ("The high-res latent (scale × the native size).",
                       "The native pass's latent, for a side-by-side.")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        required = _pass_inputs("latent_image", (
            "The native latent: an Empty Latent Image at the model's size (512² SD1.x, 768² "
            "SD2.x-v, 1024² SDXL), or any latent (with denoise < 1, an img2img native pass)."))
        required.update({
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "Denoise of the native pass, as KSampler's."}),
            "hires_steps": ("INT", {"default": 0, "min": 0, "max": 10000, "tooltip": (
                "Steps of the high-res pass; 0 = steps.")}),
            "hires_denoise": ("FLOAT", {"default": 0.7, "min": 0.0, "max": 1.0, "step": 0.01,
                                        "tooltip": ("Denoise of the high-res pass when "
                                                    "full_renoise or enabled is off.")}),
        })
        return {"required": {**required, **fam_inputs()}, **_OPTIONAL}

    @classmethod
    def VALIDATE_INPUTS(cls, am_blocks):
        return _check_blocks(am_blocks)

    def sample(self, model, positive, negative, latent_image, seed, steps, cfg, sampler_name,
               scheduler, scale, denoise, hires_steps, hires_denoise, fam_settings=None, **fam):
        from .comfyui import Sampling, hires_fix
        return hires_fix(model, latent_image,
                         Sampling(positive, negative, seed, cfg, sampler_name, scheduler),
                         steps, denoise, scale, hires_steps, hires_denoise,
                         params_from(fam, fam_settings))


class FAMHiresPass:
    DESCRIPTION = ("FAM Diffusion's high-res pass over any native latent: the output of your "
                   "own first KSampler, or an image encoded at about the model's native size "
                   "(an img2img-style upscale). The native attention comes from that latent.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("hires",)
    OUTPUT_TOOLTIPS = ("The high-res latent (scale × the input's size).",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        required = _pass_inputs("latent", (
            "The native latent: a first pass's output or an encoded image at about the "
            "model's native size."))
        required["denoise"] = ("FLOAT", {"default": 0.7, "min": 0.0, "max": 1.0, "step": 0.01,
                                         "tooltip": ("Denoise of the pass when full_renoise "
                                                     "or enabled is off.")})
        return {"required": {**required, **fam_inputs()}, **_OPTIONAL}

    @classmethod
    def VALIDATE_INPUTS(cls, am_blocks):
        return _check_blocks(am_blocks)

    def sample(self, model, positive, negative, latent, seed, steps, cfg, sampler_name,
               scheduler, scale, denoise, fam_settings=None, **fam):
        from .comfyui import Sampling, hires_pass
        return (hires_pass(model, latent,
                           Sampling(positive, negative, seed, cfg, sampler_name, scheduler),
                           steps, scale, denoise, params_from(fam, fam_settings)),)


class FAMSettings:
    DESCRIPTION = ("FAM Diffusion's settings for one or more FAM nodes (linked, they replace "
                   "the nodes' own FAM widgets).")
    CATEGORY = CATEGORY
    RETURN_TYPES = (FAM_SETTINGS,)
    RETURN_NAMES = ("fam_settings",)
    FUNCTION = "settings"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": fam_inputs()}

    @classmethod
    def VALIDATE_INPUTS(cls, am_blocks):
        return _check_blocks(am_blocks)

    def settings(self, **values):
        return (params_from(values),)


NODE_CLASS_MAPPINGS = {"FAMHiresSampler": FAMHiresSampler, "FAMHiresPass": FAMHiresPass,
                       "FAMSettings": FAMSettings}
NODE_DISPLAY_NAME_MAPPINGS = {"FAMHiresSampler": "FAM Hires Sampler",
                              "FAMHiresPass": "FAM Hires Pass", "FAMSettings": "FAM Settings"}
