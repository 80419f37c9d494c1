"""What a WebUI request asks of FAM, before any hook: whether FAM can run it, the model's
native size, the native size of a target, and FAM's reference latent z̃₀ for Hires. fix."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..unet_hooks import LATENT_FACTOR
from ..webui_args import FamRequestError

__all__ = ["check_request", "model_name", "native_side", "reference_size",
           "upscaled_reference", "per_row"]


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


def check_request(p, txt2img: bool) -> None:
    """Refuse, with a message naming the fix, what FAM cannot run."""
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
