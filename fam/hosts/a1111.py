"""AUTOMATIC1111 host: FAM on an ldm/sgm UNet driven by the WebUI's CFG denoiser.

  * the CFG denoiser's inner model (k-diffusion `CompVisDenoiser` or the timestep denoiser)
    sees every UNet batch, so each inner call opens a FAM call with its σ and row roles;
  * one CFG step's UNet batch is, per image, its cond rows (one per AND sub-prompt), then one
    uncond row per image; A1111 may split it into several inner calls in ascending row order,
    or drop the uncond rows: a `RowCursor` hands each call its slice of roles;
  * attention optimisations replace the CLASS `forward` of CrossAttention; `Attn1Hook` is an
    instance attribute that calls the layer's previous forward for every call FAM does not
    handle, so SDP/xformers/sub-quadratic keep working and removal restores the layer.
Nothing here imports `modules`."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from ..attention import am_self_attention
from ..layers import AttnLayer, LayerSelectionError, UNetLayout, discover
from ..params import FamParams
from ..record import Role
from ..schedule import VPSchedule
from .sdxl import with_native_size
from .unet_hooks import LATENT_FACTOR, NativeCall, UNetHooks, _Current
from .webui import (WebUIGeneration, alphas_cumprod_schedule, check_model, find_script,
                    model_name)
from .webui_args import FamRequestError

__all__ = ["a1111_roles", "cond_repeats", "RowCursor", "Attn1Hook", "A1111Hooks",
           "A1111Generation", "HOST", "native_cond", "unet_layout", "model_schedule",
           "NativeHints", "native_hints"]


def a1111_roles(repeats: Sequence[int], batch: int | None = None) -> list[Role]:
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
    inside FAM's UNet call goes to the run (record, or modulate with the native context);
    every other call goes to the layer's previous forward."""

    def __init__(self, hooks: "A1111Hooks", layer: AttnLayer):
        self.hooks: A1111Hooks | None = hooks
        self.name, self.module = layer.name, layer.module
        self._had_own = "forward" in layer.module.__dict__
        self._previous = layer.module.__dict__.get("forward")

    def previous(self, x, context=None, mask=None, **kwargs):
        if self._previous is not None:
            return self._previous(x, context=context, mask=mask, **kwargs)
        return type(self.module).forward(self.module, x, context=context, mask=mask, **kwargs)

    def __call__(self, x, context=None, mask=None, **kwargs):
        hooks = self.hooks
        if hooks is not None and hooks.in_unet_call and _plain_self_attention(x, context, mask, kwargs):
            ctx = hooks.run.on_attn1(self.name, x)
            if ctx is not None:
                return am_self_attention(self.module, x, ctx)
        return self.previous(x, context=context, mask=mask, **kwargs)

    def install(self) -> None:
        if isinstance(self._previous, Attn1Hook) and self._previous.hooks is not None:
            raise RuntimeError(f"FAM is already installed on {self.name}")
        self.module.forward = self

    def remove(self) -> None:
        """Restore the previous forward; if another wrapper was put on top of this one since
        (Hypertile hooks once, for good), stay in its chain as a pass-through."""
        self.hooks = None
        if self.module.__dict__.get("forward") is self:
            if self._had_own:
                self.module.forward = self._previous
            else:
                del self.module.forward


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


_HINT_FIELDS = ("used_hint_cond", "used_hint_cond_latent", "used_hint_inpaint_hijack")


def resize_hint(hint: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A ControlNet hint (1×C×H×W in [0, 1]) at another pixel size: a box filter (what
    ControlNet's own INTER_AREA does when it shrinks); an inpaint hint's 4th channel (the
    mask) stays binary."""
    out = F.interpolate(hint.float(), size=size, mode="area")
    if hint.shape[1] == 4:
        mask = F.interpolate(hint[:, 3:4].float(), size=size, mode="nearest")
        out = torch.cat([out[:, :3], (mask > 0.5).float()], 1)
    return out.to(hint.dtype)


class NativeHints:
    """sd-webui-controlnet's units at FAM's native size. ControlNet picks a unit's hint by
    the latent size only where it holds a low- and a high-res hint (txt2img with Hires. fix);
    elsewhere (img2img) a unit holds the target-size hint, which cannot condition a
    native-size call. Around each native-size call `at(hw, rows)` puts a hint resized to
    that size in the fields ControlNet reads (with the latents ControlNet made from it at an
    earlier call of that size) and puts ControlNet's own objects back afterwards."""

    def __init__(self, hook: Any):
        self.hook = hook
        self._cache: dict[tuple[int, tuple[int, int], int], tuple] = {}
        self.calls = 0      # native-size calls that got resized hints

    @contextlib.contextmanager
    def at(self, hw: Sequence[int], rows: int):
        size = (LATENT_FACTOR * int(hw[0]), LATENT_FACTOR * int(hw[1]))
        swapped = []
        try:
            for param in getattr(self.hook, "control_params", None) or ():
                hint = getattr(param, "hint_cond", None)
                if (isinstance(getattr(param, "hr_hint_cond", None), torch.Tensor)
                        or not isinstance(hint, torch.Tensor) or hint.ndim != 4
                        or tuple(hint.shape[-2:]) == size):
                    continue   # ControlNet picks by size itself, or no spatial hint
                key = (id(param), size, rows)
                mine = self._cache.get(key) or (resize_hint(hint, size), None, None)
                swapped.append((param, key, tuple(getattr(param, f) for f in _HINT_FIELDS)))
                for field, value in zip(_HINT_FIELDS, mine):
                    setattr(param, field, value)
            if swapped:
                self.calls += 1
            yield
        finally:
            for param, key, theirs in reversed(swapped):
                self._cache[key] = tuple(getattr(param, f) for f in _HINT_FIELDS)
                for field, value in zip(_HINT_FIELDS, theirs):
                    setattr(param, field, value)


def native_hints(p, unet) -> NativeHints | None:
    """sd-webui-controlnet's UNet hook of this job, when it is on `unet` (it keeps the hook
    of its latest job as `latest_network` on its script)."""
    script, _ = find_script(p, "controlnet")
    hook = getattr(script, "latest_network", None)
    if hook is None or getattr(hook, "model", None) is not unet:
        return None
    return NativeHints(hook)


def unet_layout(sd_model) -> UNetLayout:
    """The attn1 layers of an ldm/sgm UNet, or a request error naming the model family."""
    check_model(sd_model)
    try:
        return discover(sd_model.model.diffusion_model)
    except LayerSelectionError as e:
        raise FamRequestError(f"FAM: {model_name(sd_model)}: {e}") from e


def model_schedule(sd_model) -> VPSchedule:
    """The σ table A1111's samplers use for this batch (read inside `p.sample`)."""
    return alphas_cumprod_schedule(sd_model)


class _Inputs(NamedTuple):
    """An inner-model call in the units of the denoiser that made it (σ and σ-space latent,
    or t and VP latent when `vp`), and that denoiser's forward."""
    x: torch.Tensor
    sigma_in: torch.Tensor
    kwargs: dict
    vp: bool
    forward: Callable

    def for_denoiser(self, sigma: float, vp: bool, schedule: VPSchedule):
        """(x, σ or t) for a denoiser of the kind `vp` (the same UNet input either way)."""
        if vp == self.vp:
            return self.x, self.sigma_in
        scale = math.sqrt(1.0 + sigma ** 2)   # VP latent = σ-space latent / √(1 + σ²)
        x = self.x / scale if vp else self.x * scale
        value = schedule.sigma_to_t(sigma) if vp else sigma
        return x, torch.full_like(self.sigma_in, value)


class A1111Hooks(UNetHooks):
    """The attn1 hooks of the AM layers, and the inner-model calls as FAM calls. Replays run
    through the denoiser of the pass being guided, so a hires checkpoint's UNet rebuilds the
    maps, and SDXL's size conditioning is rebuilt for the native size."""

    def __init__(self, run, layers, schedule: VPSchedule):
        super().__init__(run, layers)
        self.schedule = schedule
        self.cursor = RowCursor()
        self.conditioner = None     # sgm's, for the reference path's native-size `vector`
        self.controlnet: NativeHints | None = None
        self._hooks: list[Attn1Hook] = []

    def install(self) -> None:
        """The attn1 hooks of the AM layers (none when AM cannot change anything)."""
        if not self.run.params.am_active:
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
        self._unhook()
        super().remove()
        self.conditioner = self.controlnet = None

    def _unhook(self) -> None:
        for hook in reversed(self._hooks):
            hook.remove()
        self._hooks.clear()

    def set_layers(self, layers) -> None:
        """Carry the hooks over to another UNet's layers."""
        hooked = bool(self._hooks)
        self._unhook()
        super().set_layers(layers)
        if hooked:
            self.install()

    def call(self, forward: Callable, x, sigma, kwargs: dict):
        """One inner-model call as a FAM call, at the σ of its CFG call (read there once)."""
        roles = self.cursor.take(x.shape[0])
        s = self.sigma if self.sigma is not None else self._read_sigma(sigma)
        self.open_call(s, roles, x, _Inputs(x, sigma, kwargs, self.vp, forward))
        return self.inside(forward, x, sigma, **kwargs)

    def _read_sigma(self, sigma) -> float:
        """σ of an inner call made outside a CFG call (the timestep denoisers pass t)."""
        s = float(sigma.flatten()[0])
        return self.schedule.t_to_sigma(s) if self.vp else s

    def _replay_native(self, call: NativeCall, current: _Current) -> None:
        z, s_in = call.inputs.for_denoiser(call.sigma, self.vp, self.schedule)
        with self._controlnet_at(z):
            self.inside(current.inputs.forward, z, s_in, **call.inputs.kwargs)

    def _replay_reference(self, z, sigma, current: _Current) -> None:
        cur = current.inputs
        with self._controlnet_at(z):
            self.inside(cur.forward, z, cur.sigma_in,
                        **native_cond(cur.kwargs, z.shape[-2:], self.conditioner))

    def _controlnet_at(self, z: torch.Tensor):
        if self.controlnet is None:
            return contextlib.nullcontext()
        return self.controlnet.at(z.shape[-2:], z.shape[0])

    def report(self) -> dict[str, str]:
        out = super().report()
        if self.controlnet is not None and self.controlnet.calls:
            out["FAM ControlNet"] = "native-size hints in native-size calls"
        return out


class A1111Generation(WebUIGeneration):
    """FAM for one batch of one A1111 generation (one `p.sample` call)."""

    def __init__(self, params: FamParams, layout: UNetLayout, schedule: VPSchedule,
                 model_name: str = "this model"):
        super().__init__(params, layout, schedule, model_name)
        self.hooks = A1111Hooks(self.run, self.layers, schedule)

    def _on_pass(self, p, sampler) -> None:
        self.hooks.vp = self._vp
        if self.mode == "hires":
            self.move_to(unet_layout(p.sd_model), model_name(p.sd_model))
            self.hooks.conditioner = getattr(p.sd_model, "conditioner", None)
            self.hooks.controlnet = native_hints(p, p.sd_model.model.diffusion_model)
        self._wrap_inner(sampler.model_wrap_cfg)

    def _on_cfg_call(self, x, sigma, args, kwargs) -> None:
        cond = kwargs["cond"] if "cond" in kwargs else (args[1] if len(args) > 1 else None)
        self.hooks.cursor.reset(a1111_roles(cond_repeats(cond, x.shape[0]), x.shape[0]))

    def _wrap_inner(self, cfg: Any) -> None:
        inner = cfg.inner_model
        inner_forward = inner.forward

        def inner_call(x, sigma, **kwargs):
            return self.hooks.call(inner_forward, x, sigma, kwargs)

        self.patch(inner, "forward", inner_call)


class A1111Host:
    """`Host` for AUTOMATIC1111: one `A1111Generation` per batch on the loaded sd_model."""

    def generation(self, p, params: FamParams) -> A1111Generation:
        sd_model = p.sd_model
        try:
            return A1111Generation(params, unet_layout(sd_model), model_schedule(sd_model),
                                   model_name(sd_model))
        except LayerSelectionError as e:
            raise FamRequestError(str(e)) from e


HOST = A1111Host()
