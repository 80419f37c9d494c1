"""Forge host: FAM on the UNet of the Forge WebUIs through their `UnetPatcher` (`backend/`:
Forge main, Forge Neo, ersatzForge; `ldm_patched`: Forge Classic, reForge).

The UNet is the patcher at `p.sd_model.forge_objects.unet`, shared with Forge's own copies
and reset before every sampler run: each pass puts a clone with FAM's functions in its place
(`PatcherHooks`), and `remove()` puts the replaced patcher back. What is Forge's alone: which
Forge generation a model comes from, its attention function and memory state (looked up per
generation, never imported with this module), its model types, σ table and SDXL embedder,
and the GPU memory FAM's record needs, told to Forge's memory manager."""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch

from ..guidance import token_grid
from ..layers import LayerSelectionError, UNetLayout, discover
from ..params import FamParams
from ..schedule import VPSchedule
from .patcher import Attention, PatcherHooks, sdpa_attention
from .sdxl import native_size_vector, with_native_size
from .unet_hooks import LATENT_FACTOR
from .webui import WebUIGeneration, alphas_cumprod_schedule, check_model, model_name
from .webui.extensions import patcher_refusal
from .webui_args import FamRequestError

__all__ = ["ForgeGeneration", "ForgeHost", "HOST", "forge_layout", "forge_schedule",
           "sampler_schedule", "native_vector_fn", "forge_generation", "webui_attention",
           "low_vram_mode"]

_RESERVED = "_fam_reserved_bytes"  # what FAM added to a clone's preserved sampling memory

_WEBUI = {  # generation: (attention module, its function, memory module)
    "backend": ("backend.attention", "attention_function", "backend.memory_management"),
    "ldm_patched": ("ldm_patched.ldm.modules.attention", "optimized_attention",
                    "ldm_patched.modules.model_management"),
}


def forge_generation(sd_model: Any) -> str | None:
    """'backend' (Forge main, Neo, ersatzForge: the model is a backend diffusion engine),
    'ldm_patched' (Forge Classic, reForge: an ldm/sgm model with Forge objects), or None
    (not a Forge: A1111)."""
    if not hasattr(sd_model, "forge_objects"):
        return None
    root = type(sd_model).__module__.split(".")[0]
    return "backend" if root == "backend" else "ldm_patched"


def _webui_module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:   # a fork that moved it: FAM's own equivalents serve
        return None


def webui_attention(generation: str) -> Attention:
    """The attention function Forge itself uses now (it follows the user's setting); plain
    SDPA where the fork keeps it elsewhere."""
    module_name, attr, _ = _WEBUI[generation]
    module = _webui_module(module_name)
    if module is None or not hasattr(module, attr):
        return sdpa_attention
    return lambda q, k, v, heads: getattr(module, attr)(q, k, v, heads)


def _loaded_in_parts(loaded: Any) -> bool:
    """A model Forge's memory manager could not load whole: Forge main and ersatzForge mark
    its `LoadedModel` `model_accelerated`; Forge Neo (2026) marks the torch model under its
    patcher `model_lowvram` and reports the bytes left on the CPU."""
    if getattr(loaded, "model_accelerated", False):
        return True
    offloaded = getattr(loaded, "model_offloaded_memory", None)
    if callable(offloaded) and offloaded() > 0:
        return True
    torch_model = getattr(getattr(loaded, "model", None), "model", None)
    return bool(getattr(torch_model, "model_lowvram", False))


def low_vram_mode(generation: str) -> bool:
    """Forge runs in low- or no-VRAM mode, or had to load a model in parts (it swaps modules
    to the CPU when one does not fit): FAM then keeps its record in RAM."""
    memory = _webui_module(_WEBUI[generation][2])
    state = getattr(getattr(memory, "vram_state", None), "name", "")
    swapped = any(_loaded_in_parts(m) for m in getattr(memory, "current_loaded_models", ()))
    return state in ("LOW_VRAM", "NO_VRAM") or swapped


def native_vector_fn(sd_model) -> Callable[[torch.Tensor, int, int], torch.Tensor] | None:
    """How to make SDXL's `y` for a native-size call of this model: Forge's backend engine
    builds it with its own `embedder`, the ldm_patched forks with sgm's conditioner (as A1111).
    None for models without size conditioning (SD1.x, SD2.x; the SDXL refiner, whose `y`
    carries an aesthetic score instead of target sizes, keeps its own)."""
    if not getattr(sd_model, "is_sdxl", False) or "Refiner" in type(sd_model).__name__:
        return None
    embedder = getattr(sd_model, "embedder", None)
    if callable(embedder):
        return lambda y, h, w: native_size_vector(embedder, y, h, w)
    conditioner = getattr(sd_model, "conditioner", None)
    if conditioner is not None:
        return lambda y, h, w: with_native_size(conditioner, y, h, w)
    return None


def forge_layout(sd_model: Any, model_name: str = "this model") -> UNetLayout:
    """The attn1 layers of a Forge model's UNet, or a request error naming the model family
    (Flux, SD3, Chroma and Neo's other transformers have no UNet)."""
    check_model(sd_model)
    try:
        return discover(sd_model.forge_objects.unet.model.diffusion_model)
    except LayerSelectionError as e:
        raise FamRequestError(f"FAM: {model_name}: {e}") from e


def forge_schedule(k_model: Any) -> VPSchedule:
    """The discrete noise schedule of a Forge model: its σ table (`predictor` in backend/,
    `model_sampling` in ldm_patched) as ᾱ = 1 / (1 + σ²)."""
    sampling = getattr(k_model, "predictor", None) or getattr(k_model, "model_sampling", None)
    sigmas = getattr(sampling, "sigmas", None)
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or sigmas.numel() < 2:
        raise FamRequestError("FAM: this model has no discrete noise schedule (SD1.x, SD2.x, "
                              "SDXL have one)")
    s = sigmas.detach().double().cpu()
    return VPSchedule(1.0 / (1.0 + s * s))


def sampler_schedule(sd_model: Any) -> VPSchedule:
    """The σ table Forge's sampler runs on for this batch (read inside `p.sample`, after
    the ZTSNR override): the predictor's in `backend/`; in Forge Classic and reForge the ldm
    model's `alphas_cumprod`, which their A1111 samplers are built from and which is the one
    table their ZTSNR rescales (Classic leaves `model_sampling` plain)."""
    if forge_generation(sd_model) == "ldm_patched" and isinstance(
            getattr(sd_model, "alphas_cumprod", None), torch.Tensor):
        return alphas_cumprod_schedule(sd_model)
    return forge_schedule(sd_model.forge_objects.unet.model)


class ForgeGeneration(WebUIGeneration):
    """FAM for one batch of one Forge generation (one `p.sample` call). A pass is patched when
    it begins (`_on_pass`) and again when Forge runs the hook a second time for it after
    resetting its objects (`refresh`); `remove()` puts every replaced patcher back."""

    hooks: PatcherHooks

    def __init__(self, params: FamParams, layout: UNetLayout, schedule: VPSchedule,
                 model_name: str = "this model", attention: Attention | None = None,
                 low_vram: bool = False):
        if low_vram and not params.record_offload:
            params = params.replace(record_offload=True)
        super().__init__(params, layout, schedule, model_name)
        self.hooks = PatcherHooks(self.run, self.layers, attention, host="Forge")
        if low_vram:
            self.notes["FAM record"] = "kept in RAM (low VRAM)"
        self._clones: list[tuple[Any, Any, Any]] = []   # (forge_objects, replaced, clone)
        self._shape: tuple[int, int, int] | None = None   # (batch, h, w) of the native latent

    def _on_pass(self, p, sampler) -> None:
        sd_model = p.sd_model
        if self.mode == "native":
            self._shape = (p.batch_size, p.height // LATENT_FACTOR, p.width // LATENT_FACTOR)
        else:
            self.move_to(forge_layout(sd_model, model_name(sd_model)), model_name(sd_model))
            reference = self.hooks.reference
            if reference is not None:
                self._shape = (reference.latents.shape[0], *reference.latents.shape[-2:])
                self.hooks.native_vector = native_vector_fn(sd_model)
        self.patch_unet(sd_model.forge_objects, steps=getattr(p, "steps", 0))

    def refresh(self, p) -> None:
        """Forge main runs the hook twice in the high-res pass, with the same sampler and its
        UNet objects reset in between: only the second call's patcher samples."""
        if self.mode != "idle":
            self.patch_unet(p.sd_model.forge_objects)

    def _on_cfg_call(self, x, sigma, args, kwargs) -> None:
        self.hooks.begin_step()

    def remove(self) -> None:
        """Each UNet clone still in place gives way to the patcher it replaced, then the
        rest comes off; safe to call twice."""
        for forge_objects, replaced, clone in reversed(self._clones):
            if getattr(forge_objects, "unet", None) is clone:
                forge_objects.unet = replaced
        self._clones.clear()
        super().remove()

    # ---- the UNet clone ------------------------------------------------------------
    def patch_unet(self, forge_objects: Any, steps: int = 0) -> None:
        """Put a clone of `forge_objects.unet` carrying FAM's functions in its place. Without
        AM (off, or λ = 0) the UNet is left alone: FM needs only the denoiser."""
        if not self.params.am_active:
            return
        replaced = forge_objects.unet
        conflict = patcher_refusal(getattr(replaced, "model_options", None) or {})
        if conflict is not None:
            raise conflict
        unet = self.hooks.patched(replaced)
        # a clone of a FAM clone (no reset in between) carries its reservation: count it once
        reserve = self.reserve_bytes(getattr(unet, "load_device", None), steps)
        change = reserve - getattr(replaced, _RESERVED, 0)
        if change:
            unet.add_extra_preserved_memory_during_sampling(change)
        setattr(unet, _RESERVED, reserve)
        forge_objects.unet = unet
        self._clones.append((forge_objects, replaced, unet))

    def reserve_bytes(self, device: Any, steps: int = 0) -> int:
        """GPU memory FAM's record needs during this pass, for Forge's memory manager: the
        whole record in the native pass when it stays on the GPU (bounded by the budget), one
        step's maps in the high-res pass. Nothing on the CPU."""
        if (getattr(device, "type", "cpu") == "cpu" or self._shape is None
                or not self.params.am_active):
            return 0
        if self.mode == "native":
            if self.params.record_offload:
                return 0
            return min(self.params.record_budget_bytes, 2 * max(steps, 1) * self._step_bytes())
        return self._step_bytes()

    def _step_bytes(self) -> int:
        """One native UNet evaluation's maps: a cond and an uncond row per image, per layer."""
        batch, h, w = self._shape
        size = 0
        for layer in self.layers:
            th, tw = token_grid((h, w), layer.level)
            proj = layer.module.to_q
            channels = getattr(proj, "in_features", None) or proj.weight.shape[1]
            elem = 4 if proj.weight.dtype == torch.float32 else 2
            size += 2 * batch * th * tw * channels * elem
        return size


class ForgeHost:
    """`Host` for the Forge family: one `ForgeGeneration` per batch on the loaded model, with
    the attention function and memory state of the Forge generation it comes from."""

    def generation(self, p, params: FamParams) -> ForgeGeneration:
        sd_model = p.sd_model
        generation, name = forge_generation(sd_model), model_name(sd_model)
        layout = forge_layout(sd_model, name)
        try:
            return ForgeGeneration(params, layout, sampler_schedule(sd_model),
                                   name, attention=webui_attention(generation),
                                   low_vram=low_vram_mode(generation))
        except LayerSelectionError as e:
            raise FamRequestError(str(e)) from e


HOST = ForgeHost()
