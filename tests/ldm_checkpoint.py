"""A diffusers SD1-layout pipeline written out as ONE checkpoint in the original (ldm / A1111)
layout, so that single-file loading is tested offline, on tiny weights.

Key names follow the ldm UNet, VAE and CLIP layouts: `model.diffusion_model.*` with
`input_blocks.{n}` / `middle_block.{0,1,2}` / `output_blocks.{n}` (resnet at `.0`, attention
at `.1`, up-sampler after them), `first_stage_model.*` with `down.{i}.block.{j}` and the
decoder's `up.{i}` numbered from the bottom, `cond_stage_model.transformer.*` for CLIP."""

import re

import torch

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_first(rest: str, table: dict) -> str:
    for a, b in table.items():
        if rest.startswith(a + "."):
            return b + rest[len(a):]
    return rest


def unet_key(key: str, per_level: int, up_with_attention: set) -> str:
    """diffusers UNet key -> ldm key (per_level = layers_per_block)."""
    fixed = _rename_first(key, _UNET_FIXED)
    if fixed != key:
        return fixed
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = 1 + i * (per_level + 1) + j
        return f"input_blocks.{n}.0.{_rename_first(rest, _RESNET)}" if kind == "resnets" \
            else f"input_blocks.{n}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (per_level + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename_first(m[2], _RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = i * (per_level + 1) + j
        return f"output_blocks.{n}.0.{_rename_first(rest, _RESNET)}" if kind == "resnets" \
            else f"output_blocks.{n}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        slot = 2 if i in up_with_attention else 1
        return f"output_blocks.{i * (per_level + 1) + per_level}.{slot}.conv.{m[2]}"
    raise KeyError(f"no ldm name for UNet key {key}")


_NIN = {"conv_shortcut": "nin_shortcut"}

# (diffusers AutoencoderKL key pattern, its ldm name from the match and the number of levels)
_VAE_RULES = [
    (r"(encoder|decoder)\.conv_norm_out\.(.+)", lambda m, L: f"{m[1]}.norm_out.{m[2]}"),
    (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
     lambda m, L: f"encoder.down.{m[1]}.block.{m[2]}.{_rename_first(m[3], _NIN)}"),
    (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)",
     lambda m, L: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
    (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)",
     lambda m, L: f"decoder.up.{L - 1 - int(m[1])}.block.{m[2]}.{_rename_first(m[3], _NIN)}"),
    (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
     lambda m, L: f"decoder.up.{L - 1 - int(m[1])}.upsample.conv.{m[2]}"),
    (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)",
     lambda m, L: f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename_first(m[3], _NIN)}"),
    (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)",
     lambda m, L: f"{m[1]}.mid.attn_1.{_rename_first(m[2], _VAE_ATTN)}"),
]


def vae_key(key: str, levels: int) -> str:
    """diffusers AutoencoderKL key -> ldm key."""
    for pattern, name in _VAE_RULES:
        if m := re.fullmatch(pattern, key):
            return name(m, levels)
    return key   # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def ldm_state_dict(pipe) -> dict:
    """One original-layout state dict of an SD1-layout diffusers pipeline."""
    unet, vae = pipe.unet, pipe.vae
    up_attn = {i for i, b in enumerate(unet.up_blocks) if getattr(b, "attentions", None)}
    out = {}
    for k, v in unet.state_dict().items():
        out["model.diffusion_model." + unet_key(k, unet.config.layers_per_block, up_attn)] = v
    for k, v in vae.state_dict().items():
        name = vae_key(k, len(vae.config.block_out_channels))
        if ".mid.attn_1." in name and name.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]          # ldm's VAE attention uses 1x1 convolutions
        out["first_stage_model." + name] = v
    for k, v in pipe.text_encoder.state_dict().items():   # transformers 5 drops "text_model."
        out["cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k] = v
    return {k: v.detach().contiguous().clone() for k, v in out.items()
            if isinstance(v, torch.Tensor)}
