"""Models for the runner: a diffusers pipeline folder, a Hub id or a single checkpoint file
(SD1.x, SD2.x, SDXL), reduced to what FAM's engine needs: the UNet, the model's scheduler,
prompt conditioning, and a decoder from latents to pictures.

Everything that can go wrong with the user's model input becomes a `ModelError` whose
message says where the model was looked for and what to do."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..hosts.diffusers import CfgCond

__all__ = ["ModelError", "Model", "PipelineModel", "ToyWorldModel", "load_model", "SAMPLERS",
           "make_sampler", "decode_bytes", "free_bytes", "DEFAULT_MODEL"]

TOY_PREFIX = "toy:"
DEFAULT_MODEL = TOY_PREFIX + "disc"   # shipped in fam/toy/checkpoints: offline, fast on a CPU

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_UNET_KEY = "model.diffusion_model.input_blocks.0.0.weight"

# A1111 sampler names -> diffusers scheduler class and options
SAMPLERS = {
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}

# single-file architectures (diffusers' names) that have a UNet but are not text-to-image
_NOT_TEXT_TO_IMAGE = {
    "inpainting": "an SD1.x inpainting model", "inpainting_v2": "an SD2.x inpainting model",
    "xl_inpaint": "an SDXL inpainting model", "xl_refiner": "the SDXL refiner (an img2img model)",
    "upscale": "the SD x4 upscaler", "instruct-pix2pix": "an InstructPix2Pix edit model",
    "playground-v2-5": "Playground v2.5 (an EDM model)",
}
_SINGLE_FILE_OK = {"v1": "SD1.x", "v2": "SD2.x", "xl_base": "SDXL"}

# VAE decode peak: about 7.5 activations per pixel and base channel (the SD VAE, 128 base
# channels, measured 3.85 KB per output pixel in fp32 on CPU); 8 leaves a small margin.
_DECODE_VALUES_PER_PIXEL_CHANNEL = 8
_DECODE_HEADROOM = 0.8   # tile when the estimate exceeds this share of the free memory


class ModelError(Exception):
    """The model cannot be found, loaded or used with FAM; the message says why."""


@dataclass
class Model:
    """What the runner needs from a model, whatever it was loaded from."""
    name: str                       # the infotext's "Model"
    kind: str                       # e.g. "SDXL", "SD2.x, v-prediction"
    unet: torch.nn.Module
    scheduler: Any                  # the model's own scheduler: betas, prediction type
    native_px: tuple[int, int]      # (height, width) the model was trained at
    factor: int                     # pixels per latent cell
    defaults: dict = field(default_factory=dict)   # steps, cfg, sampler suited to it
    reads_prompts: bool = True      # False: one fixed conditioning, no text encoder

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def size_conditioned(self) -> bool:
        """Whether the conditioning depends on the image size (SDXL's size embedding)."""
        return False

    def conditioning(self, prompt: str, negative: str, batch: int, size_px) -> CfgCond:
        raise NotImplementedError

    def prompt_overflow(self, text: str) -> int:
        """Tokens of `text` past the text encoder's window (cut off)."""
        return 0

    def set_tiling(self, latent_hw, mode: str) -> str | None:
        """Choose tiled or whole decoding ("auto", "on", "off"); returns a note to print when
        "auto" turned tiling on."""
        return None

    def decode(self, latent: torch.Tensor):
        """One latent (1, C, h, w) to a PIL image."""
        raise NotImplementedError


@dataclass
class PipelineModel(Model):
    pipe: Any = None

    @property
    def size_conditioned(self) -> bool:
        return getattr(self.pipe, "text_encoder_2", None) is not None

    def prompt_overflow(self, text):
        tok = self.pipe.tokenizer
        return max(0, len(tok(text).input_ids) - tok.model_max_length)

    def conditioning(self, prompt, negative, batch, size_px) -> CfgCond:
        with torch.inference_mode():
            out = self.pipe.encode_prompt(
                prompt=prompt, device=self.device, num_images_per_prompt=batch,
                do_classifier_free_guidance=True, negative_prompt=negative)
        if not self.size_conditioned:
            cond, uncond = out
            return CfgCond(torch.cat([uncond, cond]))
        cond, uncond, pooled, uncond_pooled = out
        h, w = size_px   # SDXL size conditioning: original = target = this pass's size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=cond.dtype, device=self.device)
        return CfgCond(torch.cat([uncond, cond]),
                       {"text_embeds": torch.cat([uncond_pooled, pooled]),
                        "time_ids": time_ids.repeat(2 * batch, 1)})

    def set_tiling(self, latent_hw, mode):
        vae = self.pipe.vae
        h, w = (s * self.factor for s in latent_hw)
        note = None
        tiled = mode == "on"
        if mode == "auto":
            need, free = decode_bytes(vae, h, w), free_bytes(self.device)
            tiled = free is not None and need > _DECODE_HEADROOM * free
            if tiled:
                note = (f"VAE tiling on: decoding {w}x{h} needs about {need / 2**30:.1f} GiB, "
                        f"{free / 2**30:.1f} GiB free")
        vae.enable_tiling() if tiled else vae.disable_tiling()
        return note

    def decode(self, latent):
        vae = self.pipe.vae
        cfg = vae.config
        z = latent.to(vae.dtype)
        if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
            mean = torch.tensor(cfg.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
            std = torch.tensor(cfg.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1)
            z = z * std / cfg.scaling_factor + mean
        else:
            z = z / cfg.scaling_factor
        with torch.inference_mode():
            image = vae.decode(z).sample
        return self.pipe.image_processor.postprocess(image, output_type="pil")[0]


@dataclass
class ToyWorldModel(Model):
    """A toy model shipped with the package (`fam.toy`): trained here on synthetic images, so
    plain Hires fix really fails where FAM does not. Pixel space (no VAE), one fixed
    conditioning (no text encoder)."""
    toy: Any = None

    def conditioning(self, prompt, negative, batch, size_px) -> CfgCond:
        return self.toy.cond(batch)

    def decode(self, latent):
        from PIL import Image
        from ..toy.render import to_image
        pixels = to_image(latent[0]).mul(255).round().to(torch.uint8).permute(1, 2, 0)
        return Image.fromarray(pixels.numpy())


def decode_bytes(vae, height: int, width: int) -> int:
    """Estimated peak memory of decoding one height×width image with this VAE."""
    channels = vae.config.block_out_channels[0]
    item = torch.finfo(vae.dtype).bits // 8
    return _DECODE_VALUES_PER_PIXEL_CHANNEL * channels * item * height * width


def free_bytes(device: torch.device) -> int | None:
    """Memory a decode may use on `device` (None: unknown, never tile automatically)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            return None
    return None


def make_sampler(model: Model, name: str, prediction_type: str | None = None):
    """A fresh scheduler of the named sampler on the model's own schedule."""
    import diffusers
    cls_name, options = SAMPLERS[name]
    if prediction_type:
        options = {**options, "prediction_type": prediction_type}
    return getattr(diffusers, cls_name).from_config(model.scheduler.config, **options)


# ---- loading --------------------------------------------------------------------------
def load_model(source: str | None, *, device: torch.device, dtype: torch.dtype,
               config: str | None = None) -> Model:
    """`source`: a diffusers pipeline folder, a Hub id, or a single checkpoint file / URL.
    `config`: for a single file, a diffusers folder or Hub id with its architecture's
    configuration (no weights needed)."""
    source = source or DEFAULT_MODEL
    if source.startswith(TOY_PREFIX) and not os.path.exists(source):
        if config:
            raise ModelError("--config is for single-file checkpoints; a toy model has its "
                             "configuration with it")
        return _toy_model(source[len(TOY_PREFIX):], device, dtype)
    if os.path.isdir(source):
        pipe = _from_pipeline(source, _local_index(source), dtype)
        name = os.path.basename(os.path.normpath(source))
    elif os.path.isfile(source) or source.startswith(("https://", "http://")):
        if not source.lower().endswith(SINGLE_FILE_SUFFIXES):
            raise ModelError(f"{source}: a single-file checkpoint must end in "
                             f"{', '.join(SINGLE_FILE_SUFFIXES)}")
        pipe = _from_single_file(source, config, dtype)
        name = os.path.splitext(os.path.basename(source))[0]
    elif _HUB_ID.match(source) and not source.lower().endswith(SINGLE_FILE_SUFFIXES):
        with open(_hub_file(source, "model_index.json")) as f:
            index = json.load(f)
        pipe = _from_pipeline(source, index, dtype)
        name = source
    else:
        raise ModelError(f"{source}: no such file or folder (and not a Hugging Face Hub id "
                         "of the form owner/name)")
    return _pipeline_model(pipe, name, source, device, dtype)


def _loading(source: str, what: str, fn: Callable[[], Any]) -> Any:
    """Run one loading step; any failure becomes a ModelError naming the model."""
    try:
        return fn()
    except ModelError:
        raise
    except Exception as e:  # diffusers/transformers/safetensors raise many types here
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"could not load {source} ({what}): {detail}") from e


def _hub_file(repo: str, filename: str, hint: str = "") -> str:
    """Path of one file of a Hub repository (downloaded, or from the local cache)."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.utils import (EntryNotFoundError, GatedRepoError,
                                       LocalEntryNotFoundError, RepositoryNotFoundError)
    try:
        return hf_hub_download(repo, filename)
    except GatedRepoError:
        raise ModelError(f"{repo} on the Hugging Face Hub is gated: accept its licence on "
                         "huggingface.co and log in (`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{repo}: not a local file or folder, and the Hugging Face Hub has no "
                         "such model (or it is private: log in with `hf auth login`)") from None
    except LocalEntryNotFoundError:
        why = ("offline mode is on (HF_HUB_OFFLINE=1), so only the local cache was searched"
               if constants.HF_HUB_OFFLINE else "the Hub could not be reached (no network?)")
        raise ModelError(f"{repo}: not a local file or folder; looked up on the Hugging Face Hub, "
                         f"but {why}, and its {filename} is not in the local cache "
                         f"({constants.HF_HUB_CACHE}){hint}") from None
    except EntryNotFoundError:
        raise ModelError(f"{repo} on the Hugging Face Hub has no {filename}: it is not a "
                         "diffusers pipeline (for a single checkpoint file, give its path or "
                         "URL)") from None


def _local_index(folder: str) -> dict:
    path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(folder, "config.json")):
            raise ModelError(f"{folder} holds a single model, not a pipeline: pass the pipeline "
                             "folder (the one with model_index.json)")
        raise ModelError(f"{folder} is not a diffusers pipeline folder: it has no model_index.json")
    with open(path) as f:
        return json.load(f)


def _from_pipeline(source: str, index: dict, dtype: torch.dtype):
    """Refuse what FAM cannot run from the model_index alone, then load the pipeline."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    cls_name = index.get("_class_name", "pipeline")
    parts = {k for k, v in index.items()
             if not k.startswith("_") and isinstance(v, list) and v and v[0] is not None}
    if "unet" not in parts:
        core = "a transformer" if "transformer" in parts else "no UNet"
        raise ModelError(f"FAM needs a UNet model (SD1.x, SD2.x, SDXL): {source} is a "
                         f"{cls_name} with {core}")
    missing = sorted({"vae", "text_encoder", "tokenizer"} - parts)
    if missing:
        raise ModelError(f"{source} ({cls_name}) is not a text-to-image Stable Diffusion "
                         f"pipeline: it has no {', '.join(missing)}")
    if "text_encoder_2" in parts:
        return _loading(source, "SDXL pipeline", lambda: StableDiffusionXLPipeline.from_pretrained(
            source, torch_dtype=dtype))
    return _loading(source, "SD pipeline", lambda: StableDiffusionPipeline.from_pretrained(
        source, torch_dtype=dtype, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False))


def _from_single_file(source: str, config: str | None, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import (fetch_diffusers_config,
                                                     infer_diffusers_model_type,
                                                     load_single_file_checkpoint)
    ckpt = _loading(source, "checkpoint file", lambda: load_single_file_checkpoint(source))
    arch = _loading(source, "architecture", lambda: infer_diffusers_model_type(ckpt))
    if arch in _NOT_TEXT_TO_IMAGE:
        raise ModelError(f"{source} is {_NOT_TEXT_TO_IMAGE[arch]}; FAM generates from text with "
                         "SD1.x, SD2.x and SDXL base models")
    if arch not in _SINGLE_FILE_OK:
        raise ModelError(f"FAM needs a UNet model (SD1.x, SD2.x, SDXL): {source} is a "
                         f"{arch} checkpoint")
    if _UNET_KEY not in ckpt:
        raise ModelError(f"{source} is not a Stable Diffusion checkpoint: it has no UNet weights "
                         "(model.diffusion_model.*); a LoRA, a VAE or an embedding?")
    default_config = fetch_diffusers_config(ckpt)["pretrained_model_name_or_path"]
    del ckpt   # from_single_file reads the file again (memory-mapped)
    hint = (f"; a single-file {_SINGLE_FILE_OK[arch]} checkpoint needs its architecture's "
            "configuration: pass --config with a diffusers folder of the same architecture "
            "(only its .json and tokenizer files are read)")
    if config is None:
        config = default_config
        _hub_file(config, "model_index.json", hint)
    elif not os.path.isdir(config):
        _hub_file(config, "model_index.json")
    if arch == "xl_base":
        return _loading(source, "SDXL single file", lambda: StableDiffusionXLPipeline.from_single_file(
            source, config=config, torch_dtype=dtype))
    return _loading(source, f"{_SINGLE_FILE_OK[arch]} single file",
                    lambda: StableDiffusionPipeline.from_single_file(
                        source, config=config, torch_dtype=dtype, safety_checker=None,
                        feature_extractor=None, requires_safety_checker=False))


def _toy_model(world: str, device, dtype) -> ToyWorldModel:
    import fam.toy
    try:
        toy = fam.toy.load(world)
    except ValueError as e:   # unknown world: the message lists the shipped ones
        raise ModelError(f"{TOY_PREFIX}{world}: {e}") from None
    if device.type == "cpu":
        torch.set_num_threads(1)   # ops this small: thread hand-offs cost more than they save
    toy.unet.to(device, dtype)
    toy.prompt = toy.prompt.to(device, dtype)
    px = (toy.native, toy.native)
    return ToyWorldModel(
        name=f"toy-{toy.world.name}", kind=f"toy world {toy.world.number}: {toy.world.summary}",
        unet=toy.unet, scheduler=toy.scheduler, native_px=px, factor=1,
        defaults=dict(steps=toy.steps, cfg=toy.guidance_scale, sampler="Euler"),
        reads_prompts=False, toy=toy)


def _pipeline_model(pipe, name: str, source: str, device, dtype) -> PipelineModel:
    from diffusers import UNet2DConditionModel
    unet, vae = pipe.unet, pipe.vae
    if not isinstance(unet, UNet2DConditionModel):
        raise ModelError(f"FAM needs a UNet model: {source} has a {type(unet).__name__}")
    if unet.config.in_channels != vae.config.latent_channels:
        raise ModelError(f"{source} is an inpainting or edit model (its UNet takes "
                         f"{unet.config.in_channels} input channels); FAM generates from text")
    pipe.to(device)
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)   # this VAE overflows in fp16 (diffusers upcasts it the same way)
    pipe.set_progress_bar_config(disable=True)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    side = unet.config.sample_size
    hw = tuple(side) if isinstance(side, (list, tuple)) else (side, side)
    xl = getattr(pipe, "text_encoder_2", None) is not None
    kind = {768: "SD1.x", 1024: "SD2.x"}.get(unet.config.cross_attention_dim, "SD-like")
    kind = "SDXL" if xl else kind
    if pipe.scheduler.config.get("prediction_type") == "v_prediction":
        kind += ", v-prediction"
    return PipelineModel(name=name, kind=kind, unet=unet, scheduler=pipe.scheduler,
                         native_px=(hw[0] * factor, hw[1] * factor), factor=factor,
                         defaults=dict(steps=20, cfg=7.0, sampler="DPM++ 2M Karras"), pipe=pipe)
