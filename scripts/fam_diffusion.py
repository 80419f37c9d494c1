"""FAM Diffusion for AUTOMATIC1111 stable-diffusion-webui 1.10: the always-visible script.

txt2img: the first pass is FAM's native pass (recorded), the Hires. fix pass is the FAM pass.
img2img (and the ✨ upscale button): the input image at native size is the reference and the
pass at the target size is FAM-guided. Everything FAM changes is put on for one batch by an
instance wrapper of `p.sample` and taken off in its `finally`, whatever happens in between."""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # the WebUI puts an extension root on sys.path only while loading
    sys.path.insert(0, _ROOT)

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from modules import images, processing, script_callbacks, scripts, sd_samplers_common  # noqa: E402
from modules import sd_samplers_timesteps, shared  # noqa: E402
from modules.infotext_utils import PasteField  # noqa: E402
from modules.ui_components import InputAccordion  # noqa: E402

from fam.hosts.a1111 import FamGeneration, reference_size  # noqa: E402
from fam.hosts.a1111_args import (FamRequestError, apply_xyz_overrides, decode_args,  # noqa: E402
                                  fields, infotext_value, with_xyz_override)
from fam.layers import LayerSelectionError, discover  # noqa: E402
from fam.params import FamParams  # noqa: E402
from fam.schedule import VPSchedule  # noqa: E402

TITLE = "FAM Diffusion"
GEN_ATTR = "_fam_generation"

HINT_TXT2IMG = ("FAM works inside Hires. fix: the first pass is the native image, the Hires. fix "
                "pass is the FAM pass. Turn on Hires. fix (upscale by 1.5-4) to use it.")
HINT_IMG2IMG = ("FAM upscales in img2img: set a size larger than the model's native size "
                "(512 for SD1.x, 768 for SD2.x-v, 1024 for SDXL). The input image is the "
                "native reference.")


class FamScript(scripts.Script):
    section = "accordions"
    create_group = False

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        """Controls in FamParams field order (= the positional args), labels and tooltips from
        the field metadata. No side effects: the API calls this again to read defaults."""
        spec = {f.name: f for f in fields()}
        with InputAccordion(False, label=TITLE, elem_id=self.elem_id("enabled")) as enabled:
            gr.HTML(HINT_IMG2IMG if is_img2img else HINT_TXT2IMG, elem_id=self.elem_id("hint"),
                    elem_classes=["fam-hint"])
            controls = {}
            with gr.Row():
                for name in ("fm_enabled", "am_enabled", "full_renoise", "record_offload"):
                    controls[name] = self._control(spec[name])
            with gr.Row():
                for name in ("fm_cutoff", "am_lambda"):
                    controls[name] = self._control(spec[name])
            with gr.Row():
                for name in ("am_blocks", "record_budget_mb"):
                    controls[name] = self._control(spec[name])
        enabled.accordion.webui_tooltip = spec["enabled"].metadata["doc"]  # shown by hints.js
        ordered = [enabled] + [controls[n] for n in FamParams.names()[1:]]
        self.infotext_fields = [PasteField(c, _paste(n)) for c, n in zip(ordered, FamParams.names())]
        return ordered

    def _control(self, f):
        m = f.metadata
        kw = dict(label=m["label"], value=f.default, elem_id=self.elem_id(f.name), tooltip=m["doc"])
        if f.type in ("bool", bool):
            return gr.Checkbox(**kw)
        if f.type in ("str", str):
            return gr.Textbox(**kw, max_lines=1)
        return gr.Slider(minimum=m["minimum"], maximum=m["maximum"], step=m["step"], **kw)

    def process(self, p, *args):
        """Decide per generation: clean FAM infotext (XYZ cells share the dict), read the
        settings, and either put the FAM sampler on this p or the error it must raise."""
        for key in [k for k in p.extra_generation_params if k == "FAM" or k.startswith("FAM ")]:
            del p.extra_generation_params[key]
        setattr(p, GEN_ATTR, None)
        try:
            params = apply_xyz_overrides(decode_args(args), p)
            if not params.enabled:
                return
            _check_request(p)
        except FamRequestError as e:
            _wrap_sample(p, None, e)
            return
        p.extra_generation_params.update(params.to_infotext())
        if params.full_renoise:
            p.denoising_strength = 1.0
        _wrap_sample(p, params, None)

    def process_before_every_sampling(self, p, *args, **kwargs):
        gen = getattr(p, GEN_ATTR, None)
        if gen is None:
            return
        cfg = getattr(p.sampler, "model_wrap_cfg", None)
        try:
            _begin_pass(p, gen, cfg, kwargs["x"], kwargs["noise"])
        except Exception as e:  # the WebUI would swallow it here: make the sampler raise it
            gen.fail(cfg, e)
            raise


def _paste(name):
    return lambda info: infotext_value(info, name)


# ---- per generation ---------------------------------------------------------------------
def _is_txt2img(p):
    return isinstance(p, processing.StableDiffusionProcessingTxt2Img)


def _native_side(sd_model) -> int:
    if getattr(sd_model, "is_sdxl", False):
        return 1024
    if getattr(sd_model, "is_sd2", False) and getattr(sd_model, "parameterization", "") == "v":
        return 768
    return 512


def _check_request(p):
    if _is_txt2img(p):
        if not p.enable_hr:
            raise FamRequestError(
                "FAM Diffusion runs in the Hires. fix pass: enable Hires. fix "
                "(API: \"enable_hr\": true) or turn FAM off")
        return
    if getattr(p, "image_mask", None) is not None:
        raise FamRequestError(
            "FAM Diffusion upscales whole images and does not inpaint: remove the mask "
            "or turn FAM off")
    side = _native_side(p.sd_model)
    if p.width * p.height <= side * side:
        raise FamRequestError(
            f"FAM Diffusion in img2img upscales: the target size {p.width}x{p.height} must be "
            f"larger than the model's native size {side}x{side}, or turn FAM off")


def _wrap_sample(p, params, error):
    """Instance wrapper of p.sample (one batch: first pass and hires pass). It raises the
    request's error, or runs the batch with a fresh FamGeneration and removes it in finally."""
    original = p.sample

    def sample(*args, **kwargs):
        if error is not None:
            raise error
        gen = _new_generation(p, params)
        setattr(p, GEN_ATTR, gen)
        try:
            gen.install()
            result = original(*args, **kwargs)
            if gen.error is not None:
                raise gen.error
            p.extra_generation_params.update(gen.report())
            return result
        finally:
            gen.remove()
            setattr(p, GEN_ATTR, None)

    p.sample = sample


def _model_name(sd_model) -> str:
    info = getattr(sd_model, "sd_checkpoint_info", None)
    return getattr(info, "title", None) or "this model"


def _unet(sd_model):
    unet = getattr(getattr(sd_model, "model", None), "diffusion_model", None)
    if unet is None:
        raise FamRequestError(f"FAM: {_model_name(sd_model)} has no UNet (SD1.x, SD2.x, SDXL only)")
    return unet


def _layout(sd_model):
    try:
        return discover(_unet(sd_model))
    except LayerSelectionError as e:
        raise FamRequestError(f"FAM: {_model_name(sd_model)}: {e}") from e


def _schedule(sd_model) -> VPSchedule:
    try:
        return VPSchedule(sd_model.alphas_cumprod)
    except ValueError:  # downcast ᾱ (opts.use_downcasted_alpha_bar) can repeat values
        return VPSchedule(sd_model.alphas_cumprod_original)


def _new_generation(p, params) -> FamGeneration:
    sd_model = p.sd_model
    try:
        return FamGeneration(params, _layout(sd_model), _schedule(sd_model), _model_name(sd_model))
    except LayerSelectionError as e:
        raise FamRequestError(str(e)) from e


def _begin_pass(p, gen, cfg, x, noise):
    if cfg is None:
        raise FamRequestError(f"FAM: sampler {p.sampler_name} has no CFG denoiser to guide")
    vp = isinstance(p.sampler, sd_samplers_timesteps.CompVisSampler)
    if not _is_txt2img(p):
        side = _native_side(p.sd_model)
        w, h = reference_size(p.width, p.height, side)
        gen.guide_hires(cfg, x, noise, vp, _encode_reference(p, p.init_images, w, h, x))
        return
    if not p.is_hr_pass:
        gen.record_native(cfg, vp)
        return
    layout = _layout(p.sd_model)  # a hires checkpoint may have replaced the model
    if layout.layers[0].module is not gen.layout.layers[0].module:
        gen.move_to(layout, _model_name(p.sd_model))
    reference = None
    if gen.mode != "native":  # ✨ upscale button: no first pass ran, its image is the reference
        reference = _encode_reference(p, [p.firstpass_image], p.width, p.height, x)
    gen.guide_hires(cfg, x, noise, vp, reference)


def _encode_reference(p, pil_images, width, height, like):
    """Native reference latents: each input image resized to width×height and VAE-encoded,
    one per row of `like` (a single input image serves the whole batch, as in img2img)."""
    mode = getattr(p, "resize_mode", 0)  # img2img's crop/fill choice; txt2img has none
    mode = mode if mode in (0, 1, 2) else 0
    arrays = [np.asarray(images.resize_image(mode, im.convert("RGB"), width, height),
                         dtype=np.float32) / 255.0 for im in pil_images]
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    approx = sd_samplers_common.approximation_indexes.get(shared.opts.sd_vae_encode_method)
    # the VAE samples its posterior with the global RNG: leave the WebUI's stream untouched
    cuda = [like.device] if like.device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=cuda):
        latents = sd_samplers_common.images_tensor_to_samples(batch, approx, p.sd_model)
    rows = like.shape[0]
    if latents.shape[0] == 1 and rows > 1:
        latents = latents.expand(rows, -1, -1, -1)
    if latents.shape[0] != rows:
        raise FamRequestError(f"FAM: {latents.shape[0]} input images for a batch of {rows}")
    return latents.to(like.device, like.dtype)


# ---- XYZ plot -----------------------------------------------------------------------------
def _xyz_apply(name):
    return lambda p, value, xs: with_xyz_override(p, name, value)


def add_xyz_axes():
    """One "[FAM] …" axis per setting (numbers as ranges, switches as True/False)."""
    xyz = next((d.module for d in scripts.scripts_data
                if d.script_class.__module__ == "xyz_grid.py"), None)
    if xyz is None:
        return
    have = {o.label for o in xyz.axis_options}
    for f in fields():
        label = f"[FAM] {f.metadata['label']}"
        if label in have:
            continue
        if f.type in ("bool", bool):
            opt = xyz.AxisOption(label, str, _xyz_apply(f.name), choices=xyz.boolean_choice(reverse=True))
        else:
            kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            opt = xyz.AxisOption(label, kind, _xyz_apply(f.name))
        xyz.axis_options.append(opt)


add_xyz_axes()  # --nowebui builds the script UIs before any on_before_ui callback runs
script_callbacks.on_before_ui(add_xyz_axes)
