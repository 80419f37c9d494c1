"""What a WebUI request asks of FAM, before any hook: whether FAM can run it (the request,
and the model: an SD1.x/SD2.x/SDXL UNet on a discrete ε/v schedule, decided by structure so
that an engine FAM has never seen is refused too), the model's native size, the native size
of a target, and FAM's reference latent z̃₀ for Hires. fix."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ...schedule import VPSchedule
from ..unet_hooks import LATENT_FACTOR
from ..webui_args import FamRequestError

__all__ = ["check_request", "check_model", "alphas_cumprod_schedule", "model_family",
           "model_name", "native_side", "reference_size", "upscaled_reference", "per_row"]

NEEDS = "FAM Diffusion needs an SD1.x/SD2.x/SDXL UNet model"
_UNET_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
# the latent, plus inpainting's mask and image (9) or an edit model's image (8: FAM runs and
# reports the AM calls it skips on the extra branch); 5 (depth), 7 (x4 upscaler) are refused
_INPUT_CHANNELS = (4, 8, 9)

# readable family names for the class names the WebUIs give their models: Forge backend
# engines (`p.sd_model`), ldm_patched `supported_models` / `model_base` classes, A1111's
# `ModelType`; a name not listed here is shown as the WebUI spells it
FAMILIES = {
    "StableDiffusion": "SD 1.x", "SD15": "SD 1.x", "SD1": "SD 1.x",
    "StableDiffusion2": "SD 2.x", "SD20": "SD 2.x", "SD2": "SD 2.x",
    "StableDiffusionXL": "SDXL", "SDXL": "SDXL", "SSD": "SSD-1B",
    "StableDiffusionXLRefiner": "SDXL Refiner", "SDXLRefiner": "SDXL Refiner",
    "StableDiffusion3": "SD 3", "SD3": "SD 3", "SD3Inferencer": "SD 3",
    "Flux": "Flux.1", "FluxSchnell": "Flux.1", "Flux2": "Flux.2", "Flux2K4B": "Flux.2 Klein",
    "Flux2K9B": "Flux.2 Klein", "Chroma": "Chroma", "ChromaDCT": "Chroma Radiance",
    "ChromaRadiance": "Chroma Radiance", "QwenImage": "Qwen-Image",
    "QwenImage21": "Qwen-Image", "Wan": "Wan", "WAN21_T2V": "Wan", "WAN21_I2V": "Wan",
    "WAN22": "Wan", "ZImage": "Z-Image", "Lumina2": "Lumina 2", "Anima": "Anima",
    "ErnieImage": "ERNIE-Image", "ERNIE": "ERNIE-Image", "ERNIEImage": "ERNIE-Image",
    "PiD": "PixelDiT", "Krea2": "Krea 2", "CosmosPredict2": "Cosmos Predict2",
    "HunyuanDiT": "Hunyuan-DiT", "PixArt": "PixArt", "AuraFlow": "AuraFlow",
    "HiDream": "HiDream", "Mugen": "Mugen (SDXL flow)", "SDXL_flux2": "SDXL on a Flux.2 latent",
}
# what ldm_patched's dynamic `ModelSampling` classes are made of, less the generic names
_SAMPLING_GENERIC = {"ModelSampling", "ModelSamplingAdvanced", "Module", "object"}
_DISCRETE_VP = ({"ModelSamplingDiscrete", "EPS"},
                {"ModelSamplingDiscrete", "EPS", "V_PREDICTION"})


def model_name(sd_model) -> str:
    info = getattr(sd_model, "sd_checkpoint_info", None)
    return getattr(info, "title", None) or "this model"


def native_side(sd_model) -> int:
    if getattr(sd_model, "is_sdxl", False):
        return 1024
    if getattr(sd_model, "is_sd2", False) and _v_prediction(sd_model):
        return 768
    return 512


def _v_prediction(sd_model) -> bool:
    """ldm/sgm models name it `parameterization`; Forge's backend engines keep it on the
    UNet's predictor."""
    if getattr(sd_model, "parameterization", "") == "v":
        return True
    unet = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
    predictor = getattr(getattr(unet, "model", None), "predictor", None)
    return getattr(predictor, "prediction_type", "") == "v_prediction"


def _k_model(sd_model):
    """Forge's model object behind its UNet patcher (`KModel` in backend/, a `model_base`
    class in ldm_patched), or None on A1111."""
    unet = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
    return getattr(unet, "model", None)


def _core_net(sd_model):
    """The denoising network itself: Forge's `diffusion_model` under its patcher, A1111's
    under the ldm/sgm wrapper."""
    holder = _k_model(sd_model) if hasattr(sd_model, "forge_objects") else getattr(
        sd_model, "model", None)
    return getattr(holder, "diffusion_model", None)


def model_family(sd_model) -> str:
    """The model family as a user knows it: from the class names the WebUI gives the model
    (engine, model config, model_base class, A1111's model type), else the checkpoint's
    repository name as Forge guessed it, else the engine's class name."""
    k_model = _k_model(sd_model)
    config = getattr(sd_model, "model_config", None) or getattr(k_model, "model_config", None)
    names = [type(sd_model).__name__, type(config).__name__ if config is not None else None,
             type(k_model).__name__ if k_model is not None else None,
             getattr(getattr(sd_model, "model_type", None), "name", None)]
    for name in names:
        if name in FAMILIES:
            return FAMILIES[name]
    repo = getattr(config, "huggingface_repo", None)
    if isinstance(repo, str) and repo:
        return repo
    return type(config).__name__ if config is not None else type(sd_model).__name__


def _schedule_problem(sd_model) -> str | None:
    """What is wrong with the model's noise schedule for FAM (a discrete VP table with ε or v
    prediction), or None. Positive lists of the WebUIs' own class names, so a new kind of
    schedule is refused."""
    k_model = _k_model(sd_model)
    predictor = getattr(k_model, "predictor", None)
    if predictor is not None:   # Forge backend/: `Prediction`, or a flow / EDM predictor
        kind, name = getattr(predictor, "prediction_type", None), type(predictor).__name__
        if name == "Prediction" and kind in ("epsilon", "v_prediction"):
            return None
        if kind == "const" or "Flow" in name or "Flux" in name:
            return "is a flow-matching model"
        return f"uses an unsupported noise schedule ({name}, {kind})"
    sampling = getattr(k_model, "model_sampling", None)
    if sampling is not None:   # ldm_patched: a class made of a schedule and a parameterization
        parts = {c.__name__ for c in type(sampling).__mro__} - _SAMPLING_GENERIC
        if parts in _DISCRETE_VP:
            return None
        if any("Flow" in n or n in ("CONST", "COSMOS_RFLOW") for n in parts):
            return "is a flow-matching model"
        return f"uses an unsupported noise schedule ({'/'.join(sorted(parts))})"
    param = getattr(sd_model, "parameterization", None)   # A1111's ldm/sgm models
    if isinstance(param, str) and param not in ("eps", "v"):
        return f"uses an unsupported parameterization ({param})"
    return None


def check_model(sd_model) -> None:
    """Refuse, before anything is patched, a model FAM cannot guide: a network that is not
    an ldm-style UNet (every transformer: Flux, SD 3, Qwen-Image, …, and any new one), a UNet
    on another latent or with image channels FAM cannot resize, or a schedule that is not
    discrete ε/v (flow-matching SDXL fine-tunes, EDM)."""
    net = _core_net(sd_model)
    family = model_family(sd_model)
    if net is None:
        raise FamRequestError(f"{NEEDS}; {family} has no denoising network FAM can find")
    if not all(isinstance(getattr(net, b, None), torch.nn.Module) for b in _UNET_BLOCKS):
        raise FamRequestError(f"{NEEDS}; {family} is a transformer model")
    out_ch, in_ch = getattr(net, "out_channels", 4), getattr(net, "in_channels", 4)
    if isinstance(out_ch, int) and out_ch != 4:
        raise FamRequestError(f"{NEEDS}; {family} is a UNet on a {out_ch}-channel latent")
    if isinstance(in_ch, int) and in_ch not in _INPUT_CHANNELS:
        raise FamRequestError(f"{NEEDS}; {family} is a UNet with {in_ch} input channels "
                              "(an image-conditioned model such as an upscaler or depth model)")
    problem = _schedule_problem(sd_model)
    if problem is not None:
        raise FamRequestError(f"{NEEDS}; {family} {problem}")


# ᾱ_T below this: the table was rescaled for zero terminal SNR (the WebUIs pin ᾱ_T to
# 4.9e-08; SD's own ends at 4.7e-03)
_ZTSNR_ALPHA_BAR_T = 1e-5


def alphas_cumprod_schedule(sd_model) -> VPSchedule:
    """The σ table of an ldm/sgm model's sampler (A1111, Forge Classic, reForge): its
    `alphas_cumprod` as the WebUI set it for this batch, right before `p.sample` (the noise
    schedule setting, a `ztsnr` checkpoint). With "Downcast alphas_cumprod" the fp16 table
    repeats values: FAM then follows the float32 original, which differs from it by fp16
    rounding only, unless the table was also rescaled for zero terminal SNR, where the
    WebUI's own fp16 σ overflow to ∞ at the top: refused."""
    ac = sd_model.alphas_cumprod
    try:
        return VPSchedule(ac)
    except ValueError:
        if float(ac[-1]) < _ZTSNR_ALPHA_BAR_T:
            raise FamRequestError(
                "FAM Diffusion cannot follow this noise schedule: the settings \"Downcast "
                "model alphas_cumprod to fp16\" (Downcast alphas_cumprod) and \"Noise "
                "schedule: Zero Terminal SNR\" together make the WebUI sample from σ = ∞; "
                "turn one of them off, or turn FAM off") from None
        original = getattr(sd_model, "alphas_cumprod_original", None)
        if not isinstance(original, torch.Tensor):
            raise FamRequestError("FAM: this model's alphas_cumprod table repeats values and "
                                  "has no original to follow") from None
        return VPSchedule(original)


def check_request(p, txt2img: bool) -> None:
    """Refuse, with a message naming the fix, what FAM cannot run."""
    check_model(p.sd_model)
    if txt2img:
        if not p.enable_hr:
            raise FamRequestError(
                "FAM Diffusion runs in the Hires. fix pass: enable Hires. fix "
                "(API: \"enable_hr\": true) or turn FAM off")
        return
    if getattr(p, "image_mask", None) is not None:
        raise FamRequestError(
            "FAM Diffusion upscales whole images and does not inpaint: remove the mask "
            "or turn FAM off")
    side = native_side(p.sd_model)
    if p.width * p.height <= side * side:
        raise FamRequestError(
            f"FAM Diffusion in img2img upscales: the target size {p.width}x{p.height} must be "
            f"larger than the model's native size {side}x{side}, or turn FAM off")


def reference_size(width: int, height: int, native: int, multiple: int = LATENT_FACTOR
                   ) -> tuple[int, int]:
    """The native-resolution (w, h) of a target size: the target's aspect ratio at about
    native² pixels, a multiple of 8 (one latent cell)."""
    s = native / math.sqrt(width * height)
    w = max(multiple, int(round(width * s / multiple)) * multiple)
    h = max(multiple, int(round(height * s / multiple)) * multiple)
    return w, h


def upscaled_reference(native: torch.Tensor, p, like: torch.Tensor) -> torch.Tensor:
    """z̃₀ of Hires. fix: the native latent upsampled bicubically (docs/method.md §1 step 2)
    to the WebUI's hires latent size, then cropped as the WebUI crops its own upscaled latent
    (`hr_resize` with another aspect). Falls back to `like` (the pass's own start latent)
    where the sizes do not agree."""
    size = (p.hr_upscale_to_y // LATENT_FACTOR, p.hr_upscale_to_x // LATENT_FACTOR)
    z = F.interpolate(native.to(like.device, torch.float32), size=size, mode="bicubic",
                      align_corners=False)
    ty, tx = getattr(p, "truncate_y", 0), getattr(p, "truncate_x", 0)
    z = z[:, :, ty // 2:z.shape[2] - (ty + 1) // 2, tx // 2:z.shape[3] - (tx + 1) // 2]
    if z.shape != like.shape:
        return like
    return z.to(like.dtype)


def per_row(latents: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One latent per row of `like`; a single input image serves the whole batch."""
    rows = like.shape[0]
    if latents.shape[0] == 1 and rows > 1:
        latents = latents.expand(rows, -1, -1, -1)
    if latents.shape[0] != rows:
        raise FamRequestError(f"FAM: {latents.shape[0]} input images for a batch of {rows}")
    return latents.to(like.device, like.dtype)
