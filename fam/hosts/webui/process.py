"""FAM's place in a WebUI's `process_images`: the `p.sample` wrapper that runs each batch with
a fresh generation and takes it off in a `finally`, and the set-up at the start of every
sampler pass (`process_before_every_sampling`)."""

from __future__ import annotations

import functools
from typing import Any, Protocol, Sequence

import torch

from ...params import FamParams
from ..unet_hooks import GEN_ATTR, LATENT_FACTOR
from ..webui_args import FamRequestError
from .extensions import refusal
from .generation import WebUIGeneration
from .request import native_side, per_row, reference_size, upscaled_reference

__all__ = ["WebUI", "Host", "SampleWrapper", "begin_pass"]


class WebUI(Protocol):
    """What only the WebUI can tell or do (the script implements it with `modules`)."""

    def is_txt2img(self, p) -> bool: ...

    def is_timestep_sampler(self, sampler) -> bool:
        """True for samplers whose denoiser takes timesteps and VP latents (DDIM, PLMS, UniPC)."""

    def encode(self, p, images: Sequence[Any], width: int, height: int) -> torch.Tensor:
        """PIL images resized to width×height (the WebUI's own resize) and VAE-encoded."""


class Host(Protocol):
    """One WebUI's way of putting FAM on its UNet."""

    def generation(self, p, params: FamParams) -> WebUIGeneration:
        """A fresh generation for one batch of p; raises FamRequestError for a model it
        cannot serve."""


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

    @classmethod
    def running_on_original(cls, p) -> bool:
        """p is a shallow copy of a job whose FAM run is still going (ADetailer re-runs the
        script hooks on `copy(p)` between its inpaint passes): it carries that job's active
        wrapper and shares its `extra_generation_params`, which must stay as they are."""
        wrapper = p.__dict__.get("sample")
        return isinstance(wrapper, cls) and wrapper.active and wrapper.p is not p

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
        conflict = refusal(p, self.plan.am_active)   # after every script's process
        if conflict is not None:
            raise conflict
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


def begin_pass(p, gen: WebUIGeneration, webui: WebUI, x: torch.Tensor, noise: torch.Tensor
               ) -> None:
    """`process_before_every_sampling`: set FAM up on this pass's sampler, once per sampler
    (a WebUI may run the hook twice for one pass: the host's `refresh` then). The WebUI logs
    and swallows exceptions raised here, so an error is handed to the generation, which makes
    the sampler raise it. An extension that hands both passes one sampler object does not
    make the high-res pass a `refresh`."""
    try:
        hires_begins = gen.mode == "native" and getattr(p, "is_hr_pass", False)
        if gen.sampler is not None and gen.sampler is p.sampler and not hires_begins:
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
        reference = per_row(webui.encode(p, p.init_images, w, h), x) if am else None
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
            native = per_row(native, x)
        reference = native if am else None
        native_hw = (p.height // LATENT_FACTOR, p.width // LATENT_FACTOR)
    z0 = x if native is None else upscaled_reference(native, p, x)
    gen.guide_hires(p, sampler, z0, noise, vp, reference, native_hw=native_hw)
