"""AUTOMATIC1111 host, torch level: FAM on an ldm/sgm UNet driven by the WebUI's CFG denoiser.

What only A1111 needs on top of the WebUI-common generation (`webui.WebUIGeneration`):
  * the CFG denoiser's inner model (k-diffusion `CompVisDenoiser` or the timestep denoiser)
    sees every UNet batch, so each inner call opens a FAM call with its σ and row roles;
  * the UNet batch of one CFG step: per image its cond rows (one per AND sub-prompt), then
    one uncond row per image; A1111 may split it into several inner calls in ascending row
    order, or drop the uncond rows: a `RowCursor` hands each call its slice of roles;
  * attention optimisations replace the CLASS `forward` of CrossAttention; `Attn1Hook` is an
    instance attribute that calls the layer's previous forward for every call FAM does not
    handle, so SDP/xformers/sub-quadratic keep working and removal restores the layer;
  * native replays (recompute and reference paths) run through the denoiser of the pass
    being guided, so a hires checkpoint's UNet rebuilds the maps, and SDXL's size
    conditioning is rebuilt for the native size.
Nothing here imports `modules`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..attention import am_self_attention
from ..guidance import ReplayUnavailable
from ..layers import AttnLayer, LayerSelectionError, UNetLayout, discover
from ..params import FamParams
from ..record import Role
from ..schedule import VPSchedule, noised_reference
from .webui import LATENT_FACTOR, WebUIGeneration, model_name
from .webui_args import FamRequestError

__all__ = ["cfg_roles", "cond_repeats", "RowCursor", "Attn1Hook", "FamGeneration", "HOST",
           "native_cond", "with_native_size", "same_architecture", "unet_layout"]


def cfg_roles(repeats: Sequence[int], batch: int | None = None) -> list[Role]:
    """Row roles of A1111's full CFG batch: image i's `repeats[i]` cond rows (AND parts),
    for every image, then one uncond row per image."""
    batch = len(repeats) if batch is None else batch
    cond = [Role(i, False, j) for i, n in enumerate(repeats) for j in range(n)]
    return cond + [Role(i, True) for i in range(batch)]


def cond_repeats(cond: Any, rows: int) -> list[int]:
    """AND sub-prompts per image from a `MulticondLearnedConditioning` (`.batch[i]` lists the
    composable prompts of image i); one per image when the conditioning is of another kind."""
    batch = getattr(cond, "batch", None)
    if isinstance(batch, Sequence) and len(batch) == rows:
        return [max(1, len(b)) for b in batch]
    return [1] * rows


class RowCursor:
    """Hands successive inner-model calls of one CFG step their rows' roles. A1111 makes its
    calls in ascending row order; rows past the known layout (an extra block, e.g. an edit
    model's image branch) get no role, which makes FAM skip that call visibly."""

    def __init__(self):
        self._roles: list[Role] = []
        self._at = 0

    def reset(self, roles: Sequence[Role]) -> None:
        self._roles, self._at = list(roles), 0

    def take(self, rows: int) -> list[Role]:
        out = self._roles[self._at:self._at + rows]
        self._at += rows
        return out


def _plain_self_attention(x, context, mask, extra: Mapping[str, Any]) -> bool:
    """A call FAM can modulate: self-attention on (rows, tokens, C) with nothing extra (sgm
    passes `additional_tokens=None, n_times_crossframe_attn_in_self=0`)."""
    return (x.ndim == 3 and context is None and mask is None
            and all(v is None or (isinstance(v, int) and not v) for v in extra.values()))


class Attn1Hook:
    """Instance `forward` of one attn1 layer for one generation: a self-attention call made
    while FAM is inside a UNet call goes to the run (record, or modulate with the native
    context); every other call goes to the layer's previous forward."""

    def __init__(self, gen: "FamGeneration", layer: AttnLayer):
        self.gen: FamGeneration | None = gen
        self.name, self.module = layer.name, layer.module
        self._had_own = "forward" in layer.module.__dict__
        self._previous = layer.module.__dict__.get("forward")

    def previous(self, x, context=None, mask=None, **kwargs):
        if self._previous is not None:
            return self._previous(x, context=context, mask=mask, **kwargs)
        return type(self.module).forward(self.module, x, context=context, mask=mask, **kwargs)

    def __call__(self, x, context=None, mask=None, **kwargs):
        gen = self.gen
        if gen is not None and gen.in_unet_call and _plain_self_attention(x, context, mask, kwargs):
            ctx = gen.run.on_attn1(self.name, x)
            if ctx is not None:
                return am_self_attention(self.module, x, ctx)
        return self.previous(x, context=context, mask=mask, **kwargs)

    def install(self) -> None:
        if isinstance(self._previous, Attn1Hook) and self._previous.gen is not None:
            raise RuntimeError(f"FAM is already installed on {self.name}")
        self.module.forward = self

    def remove(self) -> None:
        """Restore the previous forward; if another wrapper was put on top of this one since
        (Hypertile hooks once, for good), stay in its chain as a pass-through."""
        self.gen = None
        if self.module.__dict__.get("forward") is self:
            if self._had_own:
                self.module.forward = self._previous
            else:
                del self.module.forward


# ---- conditioning of a native-size call ----------------------------------------------------
_SIZE_KEYS = ("original_size_as_tuple", "target_size_as_tuple")
_FIXED_KEYS = {"crop_coords_top_left": 2, "aesthetic_score": 1}   # key: values per row


def with_native_size(conditioner: Any, vector: torch.Tensor, height: int, width: int
                     ) -> torch.Tensor:
    """SDXL's `vector` with its original-size and target-size embeddings made for
    height×width pixels, as the WebUI makes them for a pass at that size; the pooled text,
    crop and aesthetic-score parts are kept. sgm's `GeneralConditioner` concatenates its
    embedders' vector outputs in order and the size-like ones come after the text ones, so
    they are found walking back from the end with the model's own embedders."""
    out, end = vector.clone(), vector.shape[1]
    for embedder in reversed(list(getattr(conditioner, "embedders", ()))):
        key = getattr(embedder, "input_key", None)
        if key not in _SIZE_KEYS and key not in _FIXED_KEYS:
            break
        values = [height, width] if key in _SIZE_KEYS else [0.0] * _FIXED_KEYS[key]
        emb = embedder(torch.tensor([values], dtype=torch.float32, device=vector.device))
        start = end - emb.shape[1]
        if key in _SIZE_KEYS:
            out[:, start:end] = emb.to(out.dtype)
        end = start
    return out


def native_cond(kwargs: Mapping[str, Any], hw, conditioner: Any = None) -> dict:
    """Inner-model kwargs for a native-size call: spatial image conditioning (inpainting
    models' `c_concat`) is resized to the native latent, and SDXL's size conditioning says
    the native size; everything else is size-free."""
    cond = kwargs.get("cond")
    if not isinstance(cond, Mapping):
        return dict(kwargs)
    cond = dict(cond)
    if "c_concat" in cond:
        cond["c_concat"] = [
            F.interpolate(t, size=tuple(hw), mode="bilinear", align_corners=False)
            if isinstance(t, torch.Tensor) and t.ndim == 4 and t.shape[-2:] != (1, 1) else t
            for t in cond["c_concat"]]
    if isinstance(cond.get("vector"), torch.Tensor) and conditioner is not None:
        h, w = (LATENT_FACTOR * n for n in hw)
        cond["vector"] = with_native_size(conditioner, cond["vector"], h, w)
    return {**kwargs, "cond": cond}


# ---- the model ------------------------------------------------------------------------------
def unet_layout(sd_model) -> UNetLayout:
    unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    if unet is None:
        raise FamRequestError(f"FAM: {model_name(sd_model)} has no UNet (SD1.x, SD2.x, SDXL only)")
    try:
        return discover(unet)
    except LayerSelectionError as e:
        raise FamRequestError(f"FAM: {model_name(sd_model)}: {e}") from e


def model_schedule(sd_model) -> VPSchedule:
    try:
        return VPSchedule(sd_model.alphas_cumprod)
    except ValueError:  # downcast ᾱ (opts.use_downcasted_alpha_bar) can repeat values
        return VPSchedule(sd_model.alphas_cumprod_original)


def same_architecture(a: UNetLayout, b: UNetLayout) -> bool:
    """Whether the native record of one UNet can drive another's AM layers."""
    def sig(layout):
        return [(l.name.split("diffusion_model.")[-1], l.heads, tuple(l.module.to_q.weight.shape))
                for l in layout.layers]
    return sig(a) == sig(b)


@dataclass(frozen=True, eq=False)
class _NativeCall:
    """Replay payload of one recorded native inner-model call: its inputs in the units of
    the denoiser that made it (σ and σ-space latent, or t and VP latent when `vp`)."""
    sigma: float
    roles: tuple[Role, ...]
    x: torch.Tensor
    sigma_in: torch.Tensor
    kwargs: dict
    vp: bool

    def inputs(self, vp: bool, schedule: VPSchedule) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, σ or t) for a denoiser of the kind `vp` (the same UNet input either way)."""
        if vp == self.vp:
            return self.x, self.sigma_in
        scale = math.sqrt(1.0 + self.sigma ** 2)   # VP latent = σ-space latent / √(1 + σ²)
        x = self.x / scale if vp else self.x * scale
        value = schedule.sigma_to_t(self.sigma) if vp else self.sigma
        return x, torch.full_like(self.sigma_in, value)


class FamGeneration(WebUIGeneration):
    """FAM for one batch of one A1111 generation (one `p.sample` call): the attn1 hooks and the
    inner-model wrapper on top of the WebUI-common generation."""

    def __init__(self, params: FamParams, layout: UNetLayout, schedule: VPSchedule,
                 model_name: str = "this model"):
        super().__init__(params, layout.am_layers(params.am_block_indices, model_name=model_name),
                         schedule)
        self.layout = layout
        self.in_unet_call = False
        self._cursor = RowCursor()
        self._hooks: list[Attn1Hook] = []
        self._current = None
        self._ref = self._ref_eps = None
        self._conditioner = None
        self._hires_unet_calls = 0

    # ---- install / remove ----------------------------------------------------------
    def install(self) -> None:
        """The attn1 hooks of the AM layers (none when AM cannot change anything)."""
        if not self.params.am_active:
            return
        try:
            for layer in self.layers:
                hook = Attn1Hook(self, layer)
                hook.install()
                self._hooks.append(hook)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for hook in reversed(self._hooks):
            hook.remove()
        self._hooks.clear()
        super().remove()
        self._current = self._ref = self._ref_eps = self._conditioner = None

    def move_to(self, layout: UNetLayout, model_name: str) -> None:
        """The hires pass runs another UNet (a hires checkpoint): carry the hooks over when it
        has the same architecture, refuse clearly otherwise."""
        if not same_architecture(self.layout, layout):
            raise FamRequestError(
                f"FAM: the hires checkpoint {model_name} has a different architecture from the "
                "first-pass model; FAM needs both passes on the same kind of model "
                "(SD1.x, SD2.x or SDXL). Choose a hires checkpoint of the same kind or turn FAM off.")
        hooked = bool(self._hooks)
        for hook in reversed(self._hooks):
            hook.remove()
        self._hooks.clear()
        self.layout = layout
        self.layers = layout.am_layers(self.params.am_block_indices, model_name=model_name)
        if hooked:
            self.install()

    def report(self) -> dict[str, str]:
        out = super().report()
        run = self.run
        if (self._hires_unet_calls and self.params.am_active and not self._switched
                and run.am_calls == 0 and not run.am_skipped):
            out["FAM note"] = "AM did not run: the UNet never called its attn1 layers"
        return out

    # ---- per pass ------------------------------------------------------------------
    def _on_pass(self, p, sampler, reference) -> None:
        if self.mode == "hires":
            layout = unet_layout(p.sd_model)
            if layout.layers[0].module is not self.layout.layers[0].module:
                self.move_to(layout, model_name(p.sd_model))
            self._conditioner = getattr(p.sd_model, "conditioner", None)
            if reference is not None:
                eps = self.noise
                self._ref = reference.to(eps.device, eps.dtype)
                self._ref_eps = F.interpolate(eps.float(), size=tuple(reference.shape[-2:]),
                                              mode="nearest").to(eps.dtype)
        self._wrap_inner(sampler.model_wrap_cfg)

    def _on_cfg_call(self, x, sigma, args, kwargs) -> None:
        cond = kwargs["cond"] if "cond" in kwargs else (args[1] if len(args) > 1 else None)
        self._cursor.reset(cfg_roles(cond_repeats(cond, x.shape[0]), x.shape[0]))

    def _wrap_inner(self, cfg: Any) -> None:
        inner = cfg.inner_model
        inner_forward, vp = inner.forward, self._vp

        def inner_call(x, sigma, **kwargs):
            roles = tuple(self._cursor.take(x.shape[0]))
            s, hw = self.sigma_of(sigma, vp), tuple(x.shape[-2:])
            if self.mode == "native":
                payload = _NativeCall(s, roles, x, sigma, kwargs, vp)
                self.run.begin_call(s, roles, hw, replay=payload)
            else:
                self._hires_unet_calls += 1
                self._current = (x, sigma, kwargs, roles, inner_forward)
                self.run.begin_call(s, roles, hw)
            return self._unet(inner_forward, x, sigma, **kwargs)

        self.patch(inner, "forward", inner_call)

    def _unet(self, fn, *args, **kwargs):
        self.in_unet_call = True
        try:
            return fn(*args, **kwargs)
        finally:
            self.in_unet_call = False

    def _replay(self, payload) -> None:
        """FamRun's replay, through the denoiser of the pass being guided: re-run a recorded
        native call, or (reference path, payload = σ) run the native-size UNet on the
        reference re-noised to σ for the current call's rows."""
        x, sigma_in, kwargs, roles, forward = self._current
        if isinstance(payload, _NativeCall):
            z, s_in = payload.inputs(self._vp, self.schedule)
            self.run.begin_call(payload.sigma, payload.roles, z.shape[-2:])
            self._replay_unet(forward, z, s_in, payload.kwargs)
            return
        if len(roles) != x.shape[0]:
            return  # rows without a role: no maps, the call is skipped and reported
        sigma = float(payload)
        idx = [r.image for r in roles]
        z = noised_reference(self._ref[idx], self._ref_eps[idx], sigma, vp=self._vp).to(x.dtype)
        self.run.begin_call(sigma, roles, z.shape[-2:])
        self._replay_unet(forward, z, sigma_in, native_cond(kwargs, z.shape[-2:], self._conditioner))

    def _replay_unet(self, forward, z, sigma_in, kwargs) -> None:
        """A native-size UNet call. Hooks of other extensions that hold high-res inputs
        (ControlNet's hints) cannot take it: their shape error ends the replays of this pass
        and AM is skipped with that reason, instead of failing the generation."""
        try:
            self._unet(forward, z, sigma_in, **kwargs)
        except RuntimeError as e:
            if isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            first = (str(e).strip().splitlines() or [""])[0][:120]
            raise ReplayUnavailable(
                f"native-size UNet call failed ({type(e).__name__}: {first}); another "
                "extension's UNet hook may need the high-res size") from e


class A1111Host:
    """`Host` for AUTOMATIC1111: one `FamGeneration` per batch on the loaded sd_model."""

    def generation(self, p, params: FamParams) -> FamGeneration:
        sd_model = p.sd_model
        try:
            return FamGeneration(params, unet_layout(sd_model), model_schedule(sd_model),
                                 model_name(sd_model))
        except LayerSelectionError as e:
            raise FamRequestError(str(e)) from e


HOST = A1111Host()
