"""The toy models: tiny diffusers UNets (worlds 1–2: SD1.5-like attention in the middle
level only; world 3: self-attention only in the up-blocks, at 8×8 and 16×16 tokens), their
sampler, the fixed "prompt", and the shipped checkpoints
(`fam/toy/checkpoints/<world>.safetensors` in fp16 + `<world>.json`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["UNET_CONFIG", "UNET_CONFIGS", "unet_config", "SCHEDULER_CONFIG", "NATIVE",
           "CHECKPOINTS", "build_unet",
           "make_scheduler", "save_checkpoint", "load_checkpoint", "Checkpoint", "to_model",
           "to_image"]

NATIVE = 32                     # training size in pixels (no VAE: the latent is the image)
UNET_CONFIG = dict(
    sample_size=NATIVE, in_channels=3, out_channels=3, layers_per_block=1,
    block_out_channels=(16, 32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=8, norm_num_groups=8, cross_attention_dim=16)
# World 3: every self-attention layer is one AM can modulate (up-blocks only, none on the way
# down), at the two coarse levels: 8×8 tokens (4×4 px each) and 16×16 (one 2×2 texture cell).
UNET_CONFIGS = {"copies": dict(
    UNET_CONFIG, down_block_types=("DownBlock2D",) * 3, mid_block_type=None,
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))}
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="scaled_linear",
                        beta_start=0.00085, beta_end=0.012, prediction_type="epsilon")
PROMPT_KEY = "fam_toy.prompt_embeds"          # the fixed (1, 2, 16) conditioning
CHECKPOINTS = Path(__file__).with_name("checkpoints")


def unet_config(world: str) -> dict:
    return UNET_CONFIGS.get(world, UNET_CONFIG)


def to_model(images: torch.Tensor) -> torch.Tensor:
    """Image space [0, 1] → model space [0, 2]: the black background is 0, like the near
    zero-mean latents SD's schedule was made for. (With the usual [-1, 1] the background's
    constant −1 survives at σ_max in every pixel — √ᾱ_T ≈ 0.07 — so the model learns to read
    the image's mean from the noise, and sampling from pure noise gives tinted backgrounds.)"""
    return images * 2


def to_image(x: torch.Tensor) -> torch.Tensor:
    """Model space → image space [0, 1]."""
    return (x.float() / 2).clamp(0, 1).cpu()


def build_unet(config: dict | None = None):
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(**(config or UNET_CONFIG))


def make_scheduler(config: dict | None = None):
    """Euler on the scaled-linear schedule: the sampler every toy result uses."""
    from diffusers import EulerDiscreteScheduler
    return EulerDiscreteScheduler(**(config or SCHEDULER_CONFIG))


@dataclass
class Checkpoint:
    unet: torch.nn.Module          # float32, eval mode
    prompt: torch.Tensor           # (1, 2, 16)
    meta: dict                     # the JSON: world, configs, sampling, training record


def save_checkpoint(path: Path, unet: torch.nn.Module, prompt: torch.Tensor, meta: dict) -> None:
    """fp16 safetensors (weights + prompt) and a JSON with everything needed to rebuild."""
    from safetensors.torch import save_file
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in unet.state_dict().items()}
    tensors[PROMPT_KEY] = prompt.detach().to(torch.float16).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path.with_suffix(".safetensors")))
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")


def load_checkpoint(path: Path) -> Checkpoint:
    from safetensors.torch import load_file
    meta = json.loads(path.with_suffix(".json").read_text())
    tensors = load_file(str(path.with_suffix(".safetensors")))
    prompt = tensors.pop(PROMPT_KEY).float()
    unet = build_unet(meta["unet"])
    unet.load_state_dict({k: v.float() for k, v in tensors.items()})
    return Checkpoint(unet.eval().requires_grad_(False), prompt, meta)
