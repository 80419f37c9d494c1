"""What every WebUI host (AUTOMATIC1111 and the Forge family) shares, below the script.

The script (`scripts/fam_diffusion.py`) owns the UI and the WebUI hooks and passes the few
things only the WebUI can do through a small `WebUI` object; a host module (`a1111.py`,
later Forge's) makes one `WebUIGeneration` per batch, the object that puts FAM on the UNet.
Here lives the rest, once: request checks, native and reference sizes, FAM's reference
latent, the per-`process_images` wrapper of `p.sample`, and the start of every sampler pass.
Nothing here imports `modules`, so CI tests all of it. The interface for a new host is
described in the project's host notes (`WebUIGeneration` below is its base class)."""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Protocol, Sequence

import torch
import torch.nn.functional as F

from ..guidance import FamRun, ReplayUnavailable
from ..layers import AttnLayer
from ..params import FamParams
from ..schedule import VPSchedule
from .webui_args import FamRequestError

__all__ = ["GEN_ATTR", "WebUI", "Host", "WebUIGeneration", "SampleWrapper", "begin_pass",
           "check_request", "native_side", "reference_size", "upscaled_reference", "model_name",
           "native_size_call"]

GEN_ATTR = "_fam_generation"   # the running batch's generation, on p, for the script hooks
LATENT_FACTOR = 8              # pixels per latent cell (SD1/SD2/SDXL VAEs)
# samplers whose update rebuilds the latent in a corrector after the model call, and hand the
# rebuilt latent (their state) to the progress callback: FM must edit that one too
CORRECTOR_SAMPLERS = frozenset({"unipc"})


class WebUI(Protocol):
    """What only the WebUI can tell or do (the script implements it with `modules`)."""

    def is_txt2img(self, p) -> bool: ...

    def is_timestep_sampler(self, sampler) -> bool:
        """True for samplers whose denoiser takes timesteps and VP latents (DDIM, PLMS, UniPC)."""

    def encode(self, p, images: Sequence[Any], width: int, height: int) -> torch.Tensor:
        """PIL images resized to width×height (the WebUI's own resize) and VAE-encoded."""


class Host(Protocol):
    """One WebUI's way of putting FAM on its UNet."""

    def generation(self, p, params: FamParams) -> "WebUIGeneration":
        """A fresh generation for one batch of p; raises FamRequestError for a model it
        cannot serve."""


# ---- request checks and sizes -------------------------------------------------------------
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
    """z̃₀ of Hires. fix: the native latent upsampled bicubically (method §1 step 2) to the
    WebUI's hires latent size, then cropped as the WebUI crops its own upscaled latent
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


def _rows(latents: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """One latent per row of `like`; a single input image serves the whole batch."""
    rows = like.shape[0]
    if latents.shape[0] == 1 and rows > 1:
        latents = latents.expand(rows, -1, -1, -1)
    if latents.shape[0] != rows:
        raise FamRequestError(f"FAM: {latents.shape[0]} input images for a batch of {rows}")
    return latents.to(like.device, like.dtype)


def _sampler_kind(sampler) -> str:
    func = getattr(sampler, "func", None)
    return getattr(func, "__name__", func if isinstance(func, str) else "")


@contextlib.contextmanager
def native_size_call():
    """Around a native-size UNet call of a replay. Hooks of other extensions that hold
    high-res inputs (ControlNet's hints) cannot take it: their shape error ends the replays of
    this pass and AM is skipped with that reason, instead of failing the generation."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise ReplayUnavailable(
            f"native-size UNet call failed ({type(e).__name__}: {first}); another "
            "extension's UNet hook may need the high-res size") from e


# ---- one batch ----------------------------------------------------------------------------
class WebUIGeneration:
    """FAM for one batch of one generation: owns the `FamRun` and every instance patch, and
    takes them all off in `remove()`. The WebUI-common part: the sampler's CFG denoiser
    (`model_wrap_cfg.forward(x, sigma, …)` gets the sampler's own latent, so FM edits it in
    place there), the corrector samplers' state, the refiner switch, the report. A host
    subclass adds how the UNet is hooked (`install`, `_on_pass`, `_on_cfg_call`)."""

    def __init__(self, params: FamParams, layers: Sequence[AttnLayer], schedule: VPSchedule):
        self.params, self.layers, self.schedule = params, tuple(layers), schedule
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
        self._last_sigma: float | None = None
        self._calls_since_callback = 0

    # ---- install / remove ----------------------------------------------------------
    def install(self) -> None:
        """Before the batch: put the host's UNet hooks on (none by default)."""

    def remove(self) -> None:
        """Everything off, in reverse order; safe to call more than once."""
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
        if reference is not None:
            native_hw = tuple(reference.shape[-2:])
        self.mode, self.noise = "hires", eps
        self.run.begin_hires(z0, eps, vp=vp, replay_fn=self._replay, replay_can_stop=True,
                             reference_native_hw=native_hw)
        self._begin(p, sampler, vp, reference)

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
        """Infotext entries: what the run skipped or fell back to, plus the host's notes."""
        return {**self.run.report(), **self.notes}

    # ---- per pass ------------------------------------------------------------------
    def _begin(self, p, sampler, vp: bool, reference: torch.Tensor | None = None) -> None:
        self.sampler, self._vp, self._switched = sampler, vp, False
        self._calls_since_callback = 0
        self._on_pass(p, sampler, reference)
        self._wrap_cfg(sampler.model_wrap_cfg)
        if self.mode == "hires" and _sampler_kind(sampler) in CORRECTOR_SAMPLERS:
            self._wrap_corrector(sampler)

    def _on_pass(self, p, sampler, reference) -> None:
        """Host hook at the start of each pass (hooks on this pass's UNet and denoiser)."""

    def _on_cfg_call(self, x: torch.Tensor, sigma: float, args, kwargs) -> None:
        """Host hook before every CFG step of either pass."""

    def refresh(self, p) -> None:
        """Host hook: the WebUI ran `process_before_every_sampling` again for the pass already
        set up (Forge main does, after resetting its UNet objects)."""

    def _replay(self, payload) -> None:
        """FamRun's replay function (recompute and reference paths); hosts that record
        replays implement it."""
        raise NotImplementedError

    def sigma_of(self, sigma: Any, vp: bool | None = None) -> float:
        """σ of a denoiser call: k-diffusion passes σ, the timestep samplers pass t."""
        s = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
        return self.schedule.t_to_sigma(s) if (self._vp if vp is None else vp) else s

    def _wrap_cfg(self, cfg: Any) -> None:
        cfg_forward, model_wrap = cfg.forward, getattr(cfg, "model_wrap", None)

        def forward(x, sigma, *args, **kwargs):
            s = self.sigma_of(sigma)
            self._last_sigma, self._calls_since_callback = s, self._calls_since_callback + 1
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
                if not self._switched and getattr(cfg, "model_wrap", None) is not model_wrap:
                    self._switched = True
                    self.notes["FAM note"] = (
                        "AM off after the refiner switch" if self.mode == "hires" else
                        "AM skipped on hires steps the refiner ran in the first pass")
                    if self.mode == "native":
                        self.run.begin_call(s, (), tuple(x.shape[-2:]))

        self.patch(cfg, "forward", forward)

    def _wrap_corrector(self, sampler: Any) -> None:
        """UniPC rebuilds the latent after the model call (its corrector) from copies made
        before FM's edit, and the rebuilt one is what its next step starts from; it hands
        that latent to the progress callback. FM edits it there, in place, at the σ of the
        model call it follows (method §1 step 4: the sampler's own update uses the FM latent).
        A callback with no model call since the last one (the final, uncorrected step) is
        left alone."""
        callback = sampler.callback_state

        def callback_state(d):
            x = d.get("x") if isinstance(d, dict) else None
            if self._calls_since_callback and isinstance(x, torch.Tensor):
                self.run.guide_latent(x, self._last_sigma)
            self._calls_since_callback = 0
            return callback(d)

        self.patch(sampler, "callback_state", callback_state)


# ---- one process_images -------------------------------------------------------------------
class SampleWrapper:
    """`p.sample` for one `process_images`: every batch (one call) runs with a fresh
    generation from the host, installed before it and removed in its `finally`. The script
    puts it on in `process` and takes it off in `postprocess`; a batch that raises takes it
    off too (the exception ends the `process_images`), and the next `process` on the same p
    (Loopback, SD upscale, img2img Batch) takes off any one left, so every `process_images`
    sees exactly one wrapper and p is left as it was found. `plan` is the batch's
    `FamParams`, or the `FamRequestError` every batch must raise."""

    def __init__(self, p, host: Host, plan: FamParams | FamRequestError):
        self.p, self.host, self.plan = p, host, plan
        self.active = True
        self._had_own = "sample" in p.__dict__
        self._previous = p.__dict__.get("sample")
        self._report_keys: tuple[str, ...] = ()

    @classmethod
    def install(cls, p, host: Host, plan: FamParams | FamRequestError) -> "SampleWrapper":
        cls.remove_from(p)
        wrapper = cls(p, host, plan)
        p.sample = wrapper
        return wrapper

    @staticmethod
    def remove_from(p) -> None:
        """Take off the FAM wrapper p carries, if any (also one a shallow copy of another p
        brought along: then p gets its class's `sample` back)."""
        wrapper = p.__dict__.get("sample")
        if isinstance(wrapper, SampleWrapper):
            if wrapper.p is p:
                wrapper.remove()
            else:
                del p.__dict__["sample"]
        p.__dict__.pop(GEN_ATTR, None)

    def remove(self) -> None:
        """Restore p.sample; if another wrapper was put on top since, stay in its chain as a
        pass-through."""
        self.active = False
        if self.p.__dict__.get("sample") is self:
            if self._had_own:
                self.p.sample = self._previous
            else:
                del self.p.__dict__["sample"]

    def _inner(self):
        return self._previous or functools.partial(type(self.p).sample, self.p)

    def __call__(self, *args, **kwargs):
        if not self.active:
            return self._inner()(*args, **kwargs)
        try:
            return self._batch(*args, **kwargs)
        except BaseException:
            self.remove()
            raise

    def _batch(self, *args, **kwargs):
        p = self.p
        if isinstance(self.plan, FamRequestError):
            raise self.plan
        gen = self.host.generation(p, self.plan)
        setattr(p, GEN_ATTR, gen)
        try:
            if hasattr(p, "sample_hr_pass"):   # txt2img: keep the first-pass latent for z̃₀
                hr_pass = p.sample_hr_pass

                def sample_hr_pass(samples, *a, **k):
                    gen.first_pass_latent = samples
                    return hr_pass(samples, *a, **k)

                gen.patch(p, "sample_hr_pass", sample_hr_pass)
            gen.install()
            result = self._inner()(*args, **kwargs)
            if gen.error is not None:
                raise gen.error
            self._write_report(gen.report())
            return result
        finally:
            gen.remove()
            p.__dict__.pop(GEN_ATTR, None)

    def _write_report(self, report: dict[str, str]) -> None:
        """This batch's report replaces the previous batch's (the infotext is made per batch)."""
        params = self.p.extra_generation_params
        for key in self._report_keys:
            params.pop(key, None)
        params.update(report)
        self._report_keys = tuple(report)


# ---- the start of every sampler pass ------------------------------------------------------
def begin_pass(p, gen: WebUIGeneration, webui: WebUI, x: torch.Tensor, noise: torch.Tensor
               ) -> None:
    """`process_before_every_sampling`: set FAM up on this pass's sampler, once per sampler
    (a WebUI may run the hook twice for one pass: the host's `refresh` then). The WebUI logs
    and swallows exceptions raised here, so an error is handed to the generation, which makes
    the sampler raise it."""
    try:
        if gen.sampler is not None and gen.sampler is p.sampler:
            gen.refresh(p)
        else:
            _begin_pass(p, gen, webui, x, noise)
    except Exception as e:
        gen.fail(p.sampler, e)


def _begin_pass(p, gen: WebUIGeneration, webui: WebUI, x: torch.Tensor, noise: torch.Tensor
                ) -> None:
    sampler = p.sampler
    if getattr(sampler, "model_wrap_cfg", None) is None:
        raise FamRequestError(f"FAM: sampler {p.sampler_name} has no CFG denoiser to guide")
    vp = webui.is_timestep_sampler(sampler)
    am = gen.params.am_active
    if not webui.is_txt2img(p):   # img2img: the input image at native size is the reference
        w, h = reference_size(p.width, p.height, native_side(p.sd_model))
        reference = _rows(webui.encode(p, p.init_images, w, h), x) if am else None
        gen.guide_hires(p, sampler, x, noise, vp, reference,
                        native_hw=(h // LATENT_FACTOR, w // LATENT_FACTOR))
        return
    if not p.is_hr_pass:
        gen.record_native(p, sampler, vp)
        return
    native, reference, native_hw = gen.first_pass_latent, None, None
    if gen.mode != "native":   # ✨ upscale button: no first pass ran, its image is the reference
        if native is None and am:   # a pixel upscaler: the WebUI encoded no native latent
            native = webui.encode(p, [p.firstpass_image], p.width, p.height)
        if native is not None:
            native = _rows(native, x)
        reference = native if am else None
        native_hw = (p.height // LATENT_FACTOR, p.width // LATENT_FACTOR)
    z0 = x if native is None else upscaled_reference(native, p, x)
    gen.guide_hires(p, sampler, z0, noise, vp, reference, native_hw=native_hw)
