"""FAM Diffusion for AUTOMATIC1111 stable-diffusion-webui 1.10 and the Forge family (Forge main,
Neo, Classic, reForge): the always-visible script, one file for all of them.

txt2img: the first pass is FAM's native pass (recorded), the Hires. fix pass is the FAM pass.
img2img (and the ✨ upscale button): the input image at native size is the reference and the
pass at the target size is FAM-guided. This file holds the UI, the WebUI hooks and what needs
`modules`; the rest is in `fam.hosts.webui` (shared by every WebUI) and the host module that
hooks the UNet (`fam.hosts.a1111`, or `fam.hosts.forge` when the model has Forge's objects).
Everything FAM changes is put on for one batch by the `p.sample` wrapper and taken off in its
`finally`, whatever happens in between."""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # the WebUIs put an extension root first only while loading it;
    sys.path.append(_ROOT)  # last, so its top-level names never shadow the WebUI's or others'

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from modules import images, processing, script_callbacks, scripts, sd_samplers_common  # noqa: E402
from modules import sd_samplers_timesteps, shared  # noqa: E402
from modules.infotext_utils import PasteField  # noqa: E402
from modules.ui_components import InputAccordion  # noqa: E402

from fam.hosts import a1111, forge  # noqa: E402
from fam.hosts.webui import GEN_ATTR, SampleWrapper, begin_pass, check_request  # noqa: E402
from fam.hosts.webui_args import (FamRequestError, apply_xyz_overrides, decode_args,  # noqa: E402
                                  fields, infotext_value, screen_pasted_infotext,
                                  with_xyz_override)
from fam.params import FamParams  # noqa: E402

TITLE = "FAM Diffusion"

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
        the field metadata; the fields marked advanced in a collapsed group of their own. No
        side effects: the API calls this again to read defaults."""
        first, *rest = fields()
        tuned = [f for f in rest if not f.metadata["advanced"]]
        advanced = [f for f in rest if f.metadata["advanced"]]
        controls = {}
        with InputAccordion(False, label=TITLE, elem_id=self.elem_id("enabled")) as enabled:
            gr.HTML(HINT_IMG2IMG if is_img2img else HINT_TXT2IMG, elem_id=self.elem_id("hint"),
                    elem_classes=["fam-hint"])
            self._rows(tuned, controls)
            with gr.Accordion("Advanced", open=False, elem_id=self.elem_id("advanced")):
                self._rows(advanced, controls)
        enabled.accordion.webui_tooltip = first.metadata["doc"]  # shown by hints.js
        ordered = [enabled] + [controls[f.name] for f in rest]
        self.infotext_fields = [PasteField(c, _paste(n)) for c, n in zip(ordered, FamParams.names())]
        return ordered

    def _rows(self, group, controls):
        """The switches of a group in one row, its values (sliders, text) in the next."""
        for row in ([f for f in group if f.type in ("bool", bool)],
                    [f for f in group if f.type not in ("bool", bool)]):
            if row:
                with gr.Row():
                    for f in row:
                        controls[f.name] = self._control(f)

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
        settings, and put on p the wrapper that runs each batch with FAM, or raises the
        request's error. A wrapper an earlier process_images left on this p comes off first.
        ADetailer's inpaint passes (`_ad_inner`) and copies of a job FAM is running are left
        alone: FAM neither guides nor refuses them, and the job keeps its FAM infotext."""
        if getattr(p, "_ad_inner", False) or SampleWrapper.running_on_original(p):
            return
        SampleWrapper.remove_from(p)
        for key in [k for k in p.extra_generation_params if k == "FAM" or k.startswith("FAM ")]:
            del p.extra_generation_params[key]
        try:
            params = apply_xyz_overrides(decode_args(args), p)
            if not params.enabled:
                return
            check_request(p, WEBUI.is_txt2img(p))
        except FamRequestError as e:
            SampleWrapper.install(p, _host(p), e)
            return
        p.extra_generation_params.update(params.to_infotext())
        if params.full_renoise:
            p.denoising_strength = 1.0
        SampleWrapper.install(p, _host(p), params)

    def process_before_every_sampling(self, p, *args, **kwargs):
        gen = getattr(p, GEN_ATTR, None)
        if gen is not None:
            begin_pass(p, gen, WEBUI, kwargs["x"], kwargs["noise"])

    def postprocess(self, p, processed, *args):
        if not SampleWrapper.running_on_original(p):
            SampleWrapper.remove_from(p)


def _paste(name):
    return lambda info: infotext_value(info, name)


# ---- what only the WebUI can do ---------------------------------------------------------
def _host(p):
    """The host that puts FAM on this generation's UNet: Forge's patcher when the model has
    Forge's objects (every Forge, whatever its generation), else A1111's modules."""
    if hasattr(p.sd_model, "forge_objects"):
        return forge.HOST
    return a1111.HOST


class _A1111:
    """`fam.hosts.webui.WebUI` with A1111's modules."""

    @staticmethod
    def is_txt2img(p) -> bool:
        return isinstance(p, processing.StableDiffusionProcessingTxt2Img)

    @staticmethod
    def is_timestep_sampler(sampler) -> bool:
        return isinstance(sampler, sd_samplers_timesteps.CompVisSampler)

    @staticmethod
    def encode(p, pil_images, width, height):
        """Each image resized to width×height (img2img's crop/fill choice) and VAE-encoded."""
        mode = getattr(p, "resize_mode", 0)  # txt2img has none
        mode = mode if mode in (0, 1, 2) else 0
        arrays = [np.asarray(images.resize_image(mode, im.convert("RGB"), width, height),
                             dtype=np.float32) / 255.0 for im in pil_images]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        approx = sd_samplers_common.approximation_indexes.get(shared.opts.sd_vae_encode_method)
        # the VAE samples its posterior with the global RNG: leave the WebUI's stream untouched
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            return sd_samplers_common.images_tensor_to_samples(batch, approx, p.sd_model)


WEBUI = _A1111()


# ---- XYZ plot -----------------------------------------------------------------------------
def _xyz_apply(name):
    return lambda p, value, xs: with_xyz_override(p, name, value)


def _boolean_choices(xyz):
    """The XYZ script's True/False choices; Forge Classic moved `boolean_choice` out of it."""
    choice = getattr(xyz, "boolean_choice", None)
    return choice(reverse=True) if choice is not None else (lambda: ["False", "True"])


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
            opt = xyz.AxisOption(label, str, _xyz_apply(f.name), choices=_boolean_choices(xyz))
        else:
            kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            opt = xyz.AxisOption(label, kind, _xyz_apply(f.name))
        xyz.axis_options.append(opt)


add_xyz_axes()  # --nowebui builds the script UIs before any on_before_ui callback runs
script_callbacks.on_before_ui(add_xyz_axes)
script_callbacks.on_infotext_pasted(screen_pasted_infotext)
