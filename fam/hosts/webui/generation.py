"""One batch of a WebUI generation with FAM: the phase state machine (idle → native → hires)
driven by the WebUI's samplers. The sampler's CFG denoiser gets the sampler's own latent
(`model_wrap_cfg.forward(x, sigma, …)`), so FM edits it there, in place; a host subclass
adds the UNet side (`UNetHooks`) and what its WebUI does at the start of a pass."""

from __future__ import annotations

from typing import Any

import torch

from ...guidance import FamRun
from ...layers import AttnLayer, UNetLayout
from ...params import FamParams
from ...schedule import VPSchedule
from ..unet_hooks import Reference, UNetHooks, same_architecture
from ..webui_args import FamRequestError

__all__ = ["WebUIGeneration", "CORRECTOR_SAMPLERS"]

# samplers whose update rebuilds the latent in a corrector after the model call, and hand the
# rebuilt latent (their state) to the progress callback: FM must edit that one too
CORRECTOR_SAMPLERS = frozenset({"unipc"})


def _sampler_kind(sampler) -> str:
    func = getattr(sampler, "func", None)
    return getattr(func, "__name__", func if isinstance(func, str) else "")


def sampler_name(p, sampler) -> str:
    """The name the user chose for this pass's sampler."""
    name = getattr(getattr(sampler, "config", None), "name", None)
    if name:
        return name
    hr_name = getattr(p, "hr_sampler_name", None)
    if getattr(p, "is_hr_pass", False) and hr_name not in (None, "", "Use same sampler"):
        return hr_name
    return getattr(p, "sampler_name", "this sampler")


def check_guidable(p, sampler, vp: bool) -> None:
    """Refuse a high-res sampler FM cannot reach: a UniPC that is not a timestep sampler
    (Forge Neo's, a k-diffusion sampler) calls the denoiser with a copy of its VP latent,
    so FM's edit of that copy would never enter its trajectory."""
    if not vp and "unipc" in _sampler_kind(sampler).lower():
        raise FamRequestError(
            f"FAM Diffusion cannot guide the sampler {sampler_name(p, sampler)} in this WebUI "
            "(it runs UniPC as a k-diffusion sampler that hands the model a copy of its "
            "latent); choose another sampler for the high-res pass, e.g. Euler, DPM++ 2M or "
            "DDIM, or turn FAM off")


class WebUIGeneration:
    """FAM for one batch of one generation: owns the `FamRun`, the host's `hooks` and every
    instance patch, and takes them all off in `remove()`. A host subclass makes `hooks` and
    implements `_on_pass` (hooks on this pass's UNet and denoiser), `_on_cfg_call` and
    `refresh`."""

    hooks: UNetHooks

    def __init__(self, params: FamParams, layout: UNetLayout, schedule: VPSchedule,
                 model_name: str = "this model"):
        self.params, self.layout, self.schedule = params, layout, schedule
        self.layers: tuple[AttnLayer, ...] = layout.am_layers(params.am_block_indices,
                                                              model_name=model_name)
        self.run = FamRun(params, self.layers, schedule)
        self.mode = "idle"              # "native" after the first pass began, then "hires"
        self.sampler = None             # the sampler of the pass set up last
        self.first_pass_latent: torch.Tensor | None = None
        self.noise: torch.Tensor | None = None   # ε of the high-res pass
        self.notes: dict[str, str] = {}
        self.error: BaseException | None = None
        self._patches: list[tuple[Any, str, bool, Any]] = []
        self._vp = False
        self._switched = False          # the refiner took over during this pass
        self._pass_calls = 0            # CFG calls of the pass in progress
        self._refiner: dict[str, tuple[float, int]] = {}   # mode: (σ, the call it took over)
        self._last_sigma: float | None = None
        self._calls_since_callback = 0

    # ---- install / remove ----------------------------------------------------------
    def install(self) -> None:
        """Before the batch: the hooks that stay for the whole batch."""
        self.hooks.install()

    def remove(self) -> None:
        """Everything off, in reverse order; safe to call more than once."""
        self.hooks.remove()
        for obj, attr, had_own, value in reversed(self._patches):
            if had_own:
                setattr(obj, attr, value)
            else:
                obj.__dict__.pop(attr, None)
        self._patches.clear()
        self.run.end()
        self.first_pass_latent = self.noise = None
        self.mode = "idle"

    def patch(self, obj: Any, attr: str, value: Any) -> None:
        """Set an instance attribute for this batch; `remove()` restores what was there."""
        had_own = attr in obj.__dict__
        self._patches.append((obj, attr, had_own, obj.__dict__.get(attr)))
        setattr(obj, attr, value)

    def _unpatch(self, *objs: Any) -> None:
        """Take this batch's patches off these objects (a pass that begins on the sampler
        of the previous pass wraps it afresh, not twice)."""
        keep = []
        for entry in reversed(self._patches):
            obj, attr, had_own, value = entry
            if any(obj is o for o in objs):
                if had_own:
                    setattr(obj, attr, value)
                else:
                    obj.__dict__.pop(attr, None)
            else:
                keep.append(entry)
        self._patches = keep[::-1]

    def move_to(self, layout: UNetLayout, model_name: str) -> None:
        """The hires pass runs another UNet (a hires checkpoint): follow it when it has the
        same architecture, refuse clearly otherwise."""
        if layout.layers[0].module is self.layout.layers[0].module:
            return
        if not same_architecture(self.layout, layout):
            raise FamRequestError(
                f"FAM: the hires checkpoint {model_name} has a different architecture from the "
                "first-pass model; FAM needs both passes on the same kind of model "
                "(SD1.x, SD2.x or SDXL). Choose a hires checkpoint of the same kind or turn FAM off.")
        self.layout = layout
        self.layers = layout.am_layers(self.params.am_block_indices, model_name=model_name)
        self.hooks.set_layers(self.layers)

    # ---- passes --------------------------------------------------------------------
    def record_native(self, p, sampler, vp: bool) -> None:
        """First pass: record every UNet call of this sampler."""
        self.mode = "native"
        self.run.begin_native()
        self._begin(p, sampler, vp)

    def guide_hires(self, p, sampler, z0: torch.Tensor, eps: torch.Tensor, vp: bool,
                    reference: torch.Tensor | None = None, native_hw=None) -> None:
        """High-res pass on this sampler. z0: FAM's reference z̃₀ at the target size, eps:
        the pass's noise. With `reference` (clean native latents, B×C×h×w) there was no
        recorded native pass: the native maps come from re-noising it at each σ (recompute
        path); `native_hw` is the native latent size when there is neither."""
        if reference is None and native_hw is None and self.mode != "native":
            raise FamRequestError("FAM: the high-res pass has no native pass to follow")
        check_guidable(p, sampler, vp)
        if reference is not None:
            native_hw = tuple(reference.shape[-2:])
            self.hooks.reference = Reference(reference, eps)
        self.mode, self.noise = "hires", eps
        self.run.begin_hires(z0, eps, vp=vp, replay_fn=self.hooks.replay, replay_can_stop=True,
                             reference_native_hw=native_hw)
        self._begin(p, sampler, vp)

    def fail(self, sampler, error: BaseException) -> None:
        """Set-up of a pass failed where the WebUI swallows exceptions (script hooks): keep the
        error and make this sampler's first step raise it, so nothing runs half-way."""
        self.error = error
        cfg = getattr(sampler, "model_wrap_cfg", None)
        if cfg is not None:
            def raise_error(*args, **kwargs):
                raise error
            self.patch(cfg, "forward", raise_error)

    def report(self) -> dict[str, str]:
        """Infotext entries: what the run skipped or fell back to, and the notes."""
        return {**self.run.report(), **self.notes, **self.hooks.report(), **self._refiner_note()}

    # ---- host hooks ----------------------------------------------------------------
    def _on_pass(self, p, sampler) -> None:
        """At the start of each pass: hooks on this pass's UNet and denoiser."""

    def _on_cfg_call(self, x: torch.Tensor, sigma: float, args, kwargs) -> None:
        """Before every CFG step of either pass."""

    def refresh(self, p) -> None:
        """The WebUI ran `process_before_every_sampling` again for the pass already set up
        (Forge main does, after resetting its UNet objects)."""

    # ---- per pass ------------------------------------------------------------------
    def _begin(self, p, sampler, vp: bool) -> None:
        if sampler is self.sampler:   # an extension handed both passes one sampler
            cfg = sampler.model_wrap_cfg
            self._unpatch(sampler, cfg, getattr(cfg, "inner_model", None))
        self.sampler, self._vp, self._switched = sampler, vp, False
        self._pass_calls = 0
        self.hooks.paused = False
        self._calls_since_callback = 0
        self._on_pass(p, sampler)
        self._wrap_cfg(sampler.model_wrap_cfg)
        if self.mode == "hires" and _sampler_kind(sampler) in CORRECTOR_SAMPLERS:
            self._wrap_corrector(sampler)

    def sigma_of(self, sigma: Any) -> float:
        """σ of a denoiser call: k-diffusion passes σ, the timestep samplers pass t."""
        s = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        return self.schedule.t_to_sigma(s) if self._vp else s

    def _switch(self, sigma: float) -> None:
        """The refiner took over this pass (from this CFG call on): AM stops."""
        self._switched = self.hooks.paused = True
        self._refiner[self.mode] = (sigma, self._pass_calls)

    def _refiner_note(self) -> dict[str, str]:
        """Where AM did not run because the refiner ran: FAM records the base model's
        maps only, and the refiner's steps have none to follow."""
        notes = []
        if "native" in self._refiner:
            s, _ = self._refiner["native"]
            notes.append(f"the refiner ran the first pass from σ {s:.3g} on: hires steps "
                         "matched to those steps ran without AM")
        if "hires" in self._refiner:
            (s, at), calls = self._refiner["hires"], self._pass_calls   # the hires pass's
            notes.append(f"AM off from the refiner switch at σ {s:.3g} on "
                         f"({calls - at + 1} of {calls} hires denoiser calls)")
        return {"FAM note": "; ".join(notes)} if notes else {}

    def _wrap_cfg(self, cfg: Any) -> None:
        cfg_forward, model_wrap = cfg.forward, getattr(cfg, "model_wrap", None)

        def forward(x, sigma, *args, **kwargs):
            s = self.sigma_of(sigma)   # the one host read of σ in this CFG call
            self._last_sigma, self._calls_since_callback = s, self._calls_since_callback + 1
            self._pass_calls += 1
            self.hooks.sigma = s
            if self.mode == "native":   # FM's native size, whether or not a UNet hook runs
                self.run.native_hw = tuple(x.shape[-2:])
            if self._switched:
                if self.mode == "native":   # the refiner runs this native step: no maps for it
                    self.run.begin_call(s, (), tuple(x.shape[-2:]))
            else:
                self._on_cfg_call(x, s, args, kwargs)
            if self.mode == "hires":
                self.run.guide_latent(x, s)
            try:
                return cfg_forward(x, sigma, *args, **kwargs)
            finally:
                self.hooks.sigma = None
                if not self._switched and getattr(cfg, "model_wrap", None) is not model_wrap:
                    self._switch(s)
                    if self.mode == "native":
                        self.run.begin_call(s, (), tuple(x.shape[-2:]))

        self.patch(cfg, "forward", forward)

    def _wrap_corrector(self, sampler: Any) -> None:
        """UniPC rebuilds the latent after the model call (its corrector) from copies made
        before FM's edit, and the rebuilt one is what its next step starts from; it hands
        that latent to the progress callback. FM edits it there, in place, at the σ of the
        model call it follows (docs/method.md §1 step 4: the sampler's own update uses the FM
        latent). A callback with no model call since the last one (the final, uncorrected
        step) is left alone."""
        callback = sampler.callback_state

        def callback_state(d):
            x = d.get("x") if isinstance(d, dict) else None
            if self._calls_since_callback and isinstance(x, torch.Tensor):
                self.run.guide_latent(x, self._last_sigma)
            self._calls_since_callback = 0
            return callback(d)

        self.patch(sampler, "callback_state", callback_state)
