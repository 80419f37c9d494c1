"""Tiny random-weight Stable Diffusion pipelines saved as diffusers folders: a CLIP text
encoder and a byte-level tokenizer made from in-test vocab files, a 4-level VAE (8 pixels
per latent cell, as SD's), and the tiny SD1.5- and SDXL-layout UNets of conftest."""

import json
import os

import torch

from conftest import SCHED_KW, tiny_sd15, tiny_sdxl

NATIVE_PX = 128            # UNet sample_size 16 x 8 pixels per latent cell


def write_tokenizer(folder: str) -> str:
    """A CLIP BPE tokenizer with one token per byte (GPT-2's byte→unicode table), no merges."""
    from transformers import CLIPTokenizer
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    others = [b for b in range(256) if b not in printable]
    chars = [chr(c) for c in printable] + [chr(256 + i) for i in range(len(others))]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def text_encoder(hidden=32, projection=False, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=514, hidden_size=hidden, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=hidden, bos_token_id=512, eos_token_id=513,
                            pad_token_id=513)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def vae(seed=0):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                         norm_num_groups=8, sample_size=NATIVE_PX).eval()


def save_sd15(folder: str, prediction_type: str = "epsilon") -> str:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    unet = tiny_sd15()
    pipe = StableDiffusionPipeline(
        vae=vae(), text_encoder=text_encoder(32), tokenizer=write_tokenizer(folder + ".tok"),
        unet=unet, scheduler=EulerDiscreteScheduler(**SCHED_KW, steps_offset=1, prediction_type=prediction_type),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def save_sdxl(folder: str) -> str:
    """SDXL layout: two text encoders (16 + 16 = the UNet's 32 context channels), the second
    with a 16-wide projection = the UNet's pooled text embedding."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    tok = write_tokenizer(folder + ".tok")
    pipe = StableDiffusionXLPipeline(
        vae=vae(), text_encoder=text_encoder(16), text_encoder_2=text_encoder(16, True, seed=1),
        tokenizer=tok, tokenizer_2=tok, unet=tiny_sdxl(),
        scheduler=EulerDiscreteScheduler(**SCHED_KW, steps_offset=1))
    pipe.save_pretrained(folder)
    return folder
