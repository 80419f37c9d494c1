"""AUTOMATIC1111 host, torch level: FAM on an ldm/sgm UNet driven by the WebUI's CFG denoiser.

What A1111 gives us and how this module fits it:
  * one `CFGDenoiser` per sampler instance (a new sampler per pass). Its `forward(x, σ, …)`
    gets the sampler's own latent, so FM edits `x` in place there; its inner model (the
    k-diffusion `CompVisDenoiser` or the timestep denoiser) sees every UNet batch, so each
    inner call opens a FAM call with its σ and row roles. Both are wrapped on the instance.
  * the UNet batch of one CFG step: per image its cond rows (one per AND sub-prompt), then
    one uncond row per image; A1111 may split it into several inner calls in ascending row
    order, or drop the uncond rows: a `RowCursor` hands each call its slice of roles.
  * attention optimisations replace the CLASS `forward` of CrossAttention; `Attn1Hook` is an
    instance attribute that calls the layer's previous forward for every call FAM does not
    handle, so SDP/xformers/sub-quadratic keep working and removal restores the layer.
The WebUI-specific parts (which sampler, encoding images, errors) live in
`scripts/fam_diffusion.py`; nothing here imports `modules`."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..attention import am_self_attention
from ..guidance import FamRun
from ..layers import AttnLayer, UNetLayout
from ..params import FamParams
from ..record import Role
from ..schedule import VPSchedule, noised_reference
from .a1111_args import FamRequestError

__all__ = ["cfg_roles", "cond_repeats", "RowCursor", "Attn1Hook", "FamGeneration",
           "native_cond", "same_architecture", "reference_size"]


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


def native_cond(kwargs: Mapping[str, Any], hw) -> dict:
    """Inner-model kwargs for a native-size call: spatial image conditioning (inpainting
    models' `c_concat`) is resized to the native latent; everything else is size-free."""
    cond = kwargs.get("cond")
    if not isinstance(cond, Mapping) or "c_concat" not in cond:
        return dict(kwargs)
    resized = [F.interpolate(t, size=tuple(hw), mode="bilinear", align_corners=False)
               if isinstance(t, torch.Tensor) and t.ndim == 4 and t.shape[-2:] != (1, 1) else t
               for t in cond["c_concat"]]
    return {**kwargs, "cond": {**cond, "c_concat": resized}}


def same_architecture(a: UNetLayout, b: UNetLayout) -> bool:
    """Whether the native record of one UNet can drive another's AM layers."""
    def sig(layout):
        return [(l.name.split("diffusion_model.")[-1], l.heads, tuple(l.module.to_q.weight.shape))
                for l in layout.layers]
    return sig(a) == sig(b)


@dataclass(frozen=True)
class _NativeCall:
    """Replay payload of one recorded native inner-model call."""
    sigma: float
    roles: tuple[Role, ...]
    hw: tuple[int, int]
    call: Callable[[], Any]


class FamGeneration:
    """FAM for one batch of one generation (one `p.sample` call): owns the `FamRun`, the attn1
    hooks and every instance patch, and takes them all off in `remove()`."""

    def __init__(self, params: FamParams, layout: UNetLayout, schedule: VPSchedule,
                 model_name: str = "this model"):
        self.params, self.layout, self.schedule = params, layout, schedule
        self.layers = layout.am_layers(params.am_block_indices, model_name=model_name)
        self.run = FamRun(params, self.layers, schedule)
        self.in_unet_call = False
        self.notes: dict[str, str] = {}
        self.mode = "idle"
        self._cursor = RowCursor()
        self._hooks: list[Attn1Hook] = []
        self._patches: list[tuple[Any, str, bool, Any]] = []
        self._am_off = False
        self._current = None
        self._ref = self._ref_eps = None
        self._vp = False
        self._hires_unet_calls = 0
        self.error: BaseException | None = None

    # ---- install / remove ----------------------------------------------------------
    def install(self) -> None:
        try:
            for layer in self.layers:
                hook = Attn1Hook(self, layer)
                hook.install()
                self._hooks.append(hook)
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Everything off, in reverse order; safe to call more than once."""
        for hook in reversed(self._hooks):
            hook.remove()
        self._hooks.clear()
        for obj, attr, had_own, value in reversed(self._patches):
            if had_own:
                setattr(obj, attr, value)
            else:
                obj.__dict__.pop(attr, None)
        self._patches.clear()
        self.run.end()
        self._current = self._ref = self._ref_eps = None
        self.mode = "idle"

    def move_to(self, layout: UNetLayout, model_name: str) -> None:
        """The hires pass runs another UNet (a hires checkpoint): carry the hooks over when it
        has the same architecture, refuse clearly otherwise."""
        if not same_architecture(self.layout, layout):
            raise FamRequestError(
                f"FAM: the hires checkpoint {model_name} has a different architecture from the "
                "first-pass model; FAM needs both passes on the same kind of model "
                "(SD1.x, SD2.x or SDXL). Choose a hires checkpoint of the same kind or turn FAM off.")
        for hook in reversed(self._hooks):
            hook.remove()
        self._hooks.clear()
        self.layout = layout
        self.layers = layout.am_layers(self.params.am_block_indices, model_name=model_name)
        self.install()

    def _patch(self, obj: Any, attr: str, value: Any) -> None:
        had_own = attr in obj.__dict__
        self._patches.append((obj, attr, had_own, obj.__dict__.get(attr)))
        setattr(obj, attr, value)

    # ---- passes --------------------------------------------------------------------
    def record_native(self, cfg: Any, vp: bool) -> None:
        """First pass: record every UNet call of this sampler's denoiser."""
        self.mode = "native"
        self.run.begin_native()
        self._wrap_denoiser(cfg, vp)

    def guide_hires(self, cfg: Any, z0: torch.Tensor, eps: torch.Tensor, vp: bool,
                    reference: torch.Tensor | None = None) -> None:
        """High-res pass on this sampler's denoiser. z0: the latent the pass starts from (the
        upscaled first-pass latent, or the encoded img2img input), eps: its noise. With
        `reference` (clean native latents, B×C×h×w) there was no recorded native pass: the
        native maps come from re-noising the reference at each σ (recompute path)."""
        if reference is None and self.mode != "native":
            raise FamRequestError("FAM: the high-res pass has no native pass to follow")
        self.mode = "hires"
        self._vp = vp
        native_hw = None
        if reference is not None:
            native_hw = tuple(reference.shape[-2:])
            self._ref = reference.to(z0.device, z0.dtype)
            self._ref_eps = F.interpolate(eps.float(), size=native_hw, mode="nearest").to(eps.dtype)
        self.run.begin_hires(z0, eps, vp=vp, replay_fn=self._replay, replay_can_stop=True,
                             reference_native_hw=native_hw)
        self._wrap_denoiser(cfg, vp)

    def fail(self, cfg: Any, error: BaseException) -> None:
        """Set-up of a pass failed where the WebUI swallows exceptions (script hooks): keep the
        error, and make this sampler's first step raise it, so nothing runs half-way."""
        self.error = error
        if cfg is not None:
            def raise_error(*args, **kwargs):
                raise error
            self._patch(cfg, "forward", raise_error)

    def report(self) -> dict[str, str]:
        """Infotext entries: the run's skips and paths, plus what only the host can see."""
        run, notes = self.run, dict(self.notes)
        if (self._hires_unet_calls and self.params.am_enabled and self.params.am_lambda > 0
                and not self._am_off and run.am_calls == 0 and not run.am_skipped):
            notes["FAM note"] = "AM did not run: the UNet never called its attn1 layers"
        return {**run.report(), **notes}

    # ---- the denoiser wrappers -----------------------------------------------------
    def sigma_of(self, sigma: Any, vp: bool) -> float:
        """σ of a denoiser call: k-diffusion passes σ, the timestep samplers pass t."""
        s = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        return self.schedule.t_to_sigma(s) if vp else s

    def _wrap_denoiser(self, cfg: Any, vp: bool) -> None:
        inner = cfg.inner_model
        cfg_forward, inner_forward = cfg.forward, inner.forward

        def forward(x, sigma, *args, **kwargs):
            cond = kwargs["cond"] if "cond" in kwargs else (args[1] if len(args) > 1 else None)
            self._cursor.reset(cfg_roles(cond_repeats(cond, x.shape[0]), x.shape[0]))
            if self.mode == "hires":
                self.run.guide_latent(x, self.sigma_of(sigma, vp))
            try:
                return cfg_forward(x, sigma, *args, **kwargs)
            finally:
                if getattr(cfg, "model_wrap", inner) is not inner and not self._am_off:
                    self._am_off = True
                    self.notes["FAM note"] = "AM off after the refiner switch"

        def inner_call(x, sigma, **kwargs):
            if self._am_off:
                return inner_forward(x, sigma, **kwargs)
            roles = tuple(self._cursor.take(x.shape[0]))
            s, hw = self.sigma_of(sigma, vp), tuple(x.shape[-2:])
            if self.mode == "native":
                call = functools.partial(inner_forward, x, sigma, **kwargs)
                self.run.begin_call(s, roles, hw, replay=_NativeCall(s, roles, hw, call))
            else:
                self._hires_unet_calls += 1
                self._current = (x, sigma, kwargs, roles, inner_forward)
                self.run.begin_call(s, roles, hw)
            return self._unet(inner_forward, x, sigma, **kwargs)

        self._patch(cfg, "forward", forward)
        self._patch(inner, "forward", inner_call)

    def _unet(self, fn, *args, **kwargs):
        self.in_unet_call = True
        try:
            return fn(*args, **kwargs)
        finally:
            self.in_unet_call = False

    def _replay(self, payload) -> None:
        """FamRun's replay: re-run a recorded native call, or (reference path, payload = σ)
        run the native UNet on the reference re-noised to σ for the current call's rows."""
        if isinstance(payload, _NativeCall):
            self.run.begin_call(payload.sigma, payload.roles, payload.hw)
            self._unet(payload.call)
            return
        sigma = float(payload)
        x, sigma_in, kwargs, roles, forward = self._current
        if len(roles) != x.shape[0]:
            return  # rows without a role: no maps, the call is skipped and reported
        idx = [r.image for r in roles]
        z = noised_reference(self._ref[idx], self._ref_eps[idx], sigma, vp=self._vp).to(x.dtype)
        self.run.begin_call(sigma, roles, z.shape[-2:])
        self._unet(forward, z, sigma_in, **native_cond(kwargs, z.shape[-2:]))


def reference_size(width: int, height: int, native: int, multiple: int = 8) -> tuple[int, int]:
    """The native-resolution (w, h) of a target size: the target's aspect ratio at about
    native² pixels, a multiple of 8 (one latent cell)."""
    s = native / math.sqrt(width * height)
    w = max(multiple, int(round(width * s / multiple)) * multiple)
    h = max(multiple, int(round(height * s / multiple)) * multiple)
    return w, h
