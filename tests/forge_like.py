"""Stand-ins for what the Forge host meets in the Forge WebUIs, written for these tests from
reading their public source (never copied): a `UnetPatcher` with the real method names and
its deep-copying `clone()`, a k-model whose `apply_model` takes σ, a UNet whose transformer
blocks apply `attn1_patch` / `attn1_replace` as Forge's do, and the CFG batch assembly
(one chunk of B rows per AND part and for the uncond, taken from the back, in several UNet
calls when memory is short)."""

import copy
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import ldm_like


def _attention(q, k, v, heads):
    def split(t):
        return t.unflatten(-1, (heads, -1)).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).flatten(2)


class Block(ldm_like.BasicTransformerBlock):
    """attn1 as Forge runs it: patches see the normalised input, a replacement registered for
    (block name, block number, transformer index) gets q, k, v projected."""

    def forward(self, x, context, transformer_options=None):
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
        x = attn.to_out(out) + x
        return self.attn2(self.norm2(x), context=context) + x


class Spatial(ldm_like.SpatialTransformer):
    def forward(self, x, context, transformer_options=None):
        opts = {} if transformer_options is None else transformer_options
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        for i, blk in enumerate(self.transformer_blocks):
            opts["block_index"] = i
            t = blk(t, context, opts)
        return t.transpose(1, 2).reshape(b, c, h, w) + x


class Seq(ldm_like.Seq):
    def forward(self, x, context, size=None, transformer_options=None):
        for m in self:
            if isinstance(m, ldm_like.Upsample):
                x = m(x, context, size)
            elif isinstance(m, Spatial):
                x = m(x, context, transformer_options)
            else:
                x = m(x, context)
        return x


class UNet(ldm_like.LdmUNet):
    """Sets `block` (("input", i), ("middle", 0), ("output", i)) in the transformer options
    before each block, as Forge's UNet does."""

    def forward(self, x, context, transformer_options=None):
        opts = {} if transformer_options is None else transformer_options
        opts["original_shape"] = list(x.shape)
        hs = []
        for i, blk in enumerate(self.input_blocks):
            opts["block"] = ("input", i)
            x = blk(x, context, transformer_options=opts)
            hs.append(x)
        opts["block"] = ("middle", 0)
        x = self.middle_block(x, context, transformer_options=opts)
        for i, blk in enumerate(self.output_blocks):
            opts["block"] = ("output", i)
            x = torch.cat([x, hs.pop()], 1)
            x = blk(x, context, hs[-1].shape[-2:] if hs else None, transformer_options=opts)
        return self.out(x)


_SWAP = {ldm_like.LdmUNet: UNet, ldm_like.Seq: Seq, ldm_like.SpatialTransformer: Spatial,
         ldm_like.BasicTransformerBlock: Block}


def forge_unet(unet: ldm_like.LdmUNet) -> UNet:
    """The same modules and weights, with Forge's way of calling attn1."""
    for m in unet.modules():
        m.__class__ = _SWAP.get(type(m), type(m))
    return unet


class KModel(nn.Module):
    """k-diffusion form: σ in, x0 out; `predictor.sigmas` is the model's σ table."""

    def __init__(self, unet, sigmas):
        super().__init__()
        self.diffusion_model = unet
        self.predictor = SimpleNamespace(sigmas=sigmas)

    def apply_model(self, x, t, c_crossattn=None, c_concat=None, control=None,
                    transformer_options=None, **kwargs):
        sigma = t[:, None, None, None]
        eps = self.diffusion_model(x * (sigma ** 2 + 1) ** -0.5, c_crossattn, transformer_options)
        return x - sigma * eps


class UnetPatcher:
    def __init__(self, model, load_device="cpu"):
        self.model = model
        self.load_device = torch.device(load_device)
        self.model_options = {"transformer_options": {}}
        self.extra_preserved_memory_during_sampling = 0

    def clone(self):
        n = UnetPatcher(self.model, self.load_device)
        n.model_options = copy.deepcopy(self.model_options)
        n.extra_preserved_memory_during_sampling = self.extra_preserved_memory_during_sampling
        return n

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


def cond_uncond_batch(unet, parts, uncond, x, sigma, max_chunks=None, calls=None):
    """Mean of every AND part's prediction, and the uncond prediction (None without it).
    Chunks are taken from the back of [part 0, …, part n-1, uncond], `max_chunks` per call."""
    to_run = [(p, 0) for p in parts] + ([(uncond, 1)] if uncond is not None else [])
    out = {0: [], 1: []}
    while to_run:
        picked = list(reversed(range(len(to_run))))[:max_chunks or len(to_run)]
        batch = [to_run.pop(i) for i in picked]
        kinds = [k for _, k in batch]
        opts = dict(unet.model_options["transformer_options"], cond_or_uncond=kinds[:], sigmas=sigma)
        args = {"input": torch.cat([x] * len(batch)), "timestep": torch.cat([sigma] * len(batch)),
                "c": {"c_crossattn": torch.cat([c for c, _ in batch]), "transformer_options": opts},
                "cond_or_uncond": kinds}
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
    `timesteps`: the DDIM-style denoiser (t and a VP latent in, ε out; the UNet gets σ)."""

    def __init__(self, sd_model, max_chunks=None, timesteps=False):
        super().__init__()
        self.sd_model, self.max_chunks, self.timesteps = sd_model, max_chunks, timesteps
        self.calls = []

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond=0.0, image_cond=None):
        if self.timesteps:
            sig = self.sd_model.forge_objects.unet.model.predictor.sigmas
            sigma = sig[sigma.round().long()].to(x.dtype)
            x = x * (sigma ** 2 + 1).sqrt()[:, None, None, None]
        parts = [torch.stack([p[j] for p in cond.batch]) for j in range(len(cond.batch[0]))]
        c, u = cond_uncond_batch(self.sd_model.forge_objects.unet, parts,
                                 None if cond_scale == 1 else uncond, x, sigma,
                                 self.max_chunks, self.calls)
        den = c if u is None else u + (c - u) * cond_scale
        if self.timesteps:
            return (x - den) / sigma[:, None, None, None]
        return den


def sd_model(unet, sigmas, kind="StableDiffusion"):
    """`p.sd_model` of a Forge WebUI: the patcher at `forge_objects.unet`."""
    model = type(kind, (SimpleNamespace,), {})()
    model.forge_objects = SimpleNamespace(unet=UnetPatcher(KModel(unet, sigmas)))
    return model
