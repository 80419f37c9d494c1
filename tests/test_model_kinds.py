"""Which models FAM serves, decided by their structure before anything is patched: an
ldm-style UNet (input/middle/output blocks) on a 4-channel latent, with a discrete ε or v
schedule. Every other model the WebUIs load is refused with a message naming its family,
in the shape each fork gives it: Forge main / Neo / ersatzForge engines (`backend/`), Forge
Classic / reForge models (`ldm_patched`), A1111 1.10's SD 3; an engine no WebUI has yet is
refused the same way."""

import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import forge_like
from a1111_like import sd_model as a1111_model
from fam.hosts.webui import check_model, model_family
from fam.hosts.webui_args import FamRequestError
from ldm_like import sd1_like, sdxl_like
from test_a1111_script import fresh_log, web  # noqa: F401 - the same miniature WebUI
from test_forge import SIGMA_TABLE

NEEDS = "FAM Diffusion needs an SD1.x/SD2.x/SDXL UNet model; "


# ---- stand-ins of each family's shape ---------------------------------------------------
def net(kind, **blocks):
    """A network of the class `kind` holding ModuleLists under the given names."""
    module = type(kind, (nn.Module,), {})()
    for name, n in blocks.items():
        setattr(module, name, nn.ModuleList(nn.Linear(2, 2) for _ in range(n)))
    return module


NETS = {   # the core network classes the forks load, by their block containers
    "mmdit": lambda: net("MMDiTX", joint_blocks=2),
    "flux": lambda: net("IntegratedFluxTransformer2DModel", double_blocks=2, single_blocks=2),
    "chroma": lambda: net("IntegratedChromaTransformer2DModel", double_blocks=2, single_blocks=2),
    "qwen": lambda: net("QwenImageTransformer2DModel", transformer_blocks=2),
    "wan": lambda: net("WanModel", blocks=2),
    "nextdit": lambda: net("NextDiT", layers=2, noise_refiner=1, context_refiner=1),
    "anima": lambda: net("Anima", blocks=2),
    "ernie": lambda: net("ErnieImageModel", layers=2),
    "pid": lambda: net("PidNet", blocks=2),
    "krea": lambda: net("SingleStreamDiT", blocks=2),
    "dit": lambda: net("MiniTrainDIT", blocks=2),
}


def predictor(kind="PredictionDiscreteFlow", prediction_type="const"):
    p = type(kind, (), {})()
    p.sigmas, p.prediction_type = SIGMA_TABLE, prediction_type
    return p


def engine(kind, core, pred=None, repo=None, module="backend.diffusion_engine.x"):
    """A Forge `backend/` engine: `p.sd_model` of Forge main, Neo and ersatzForge."""
    model = type(kind, (SimpleNamespace,), {"__module__": module})(
        sd_checkpoint_info=SimpleNamespace(title=f"{kind.lower()}.safetensors"))
    if repo is not None:
        model.model_config = type("Guess", (), {"huggingface_repo": repo})()
    k_model = forge_like.KModel(core, SIGMA_TABLE, pred or predictor())
    model.forge_objects = SimpleNamespace(unet=forge_like.UnetPatcher(k_model))
    return model


# (engine class, core network, family in the message): Forge main, Neo (2025-11 and 2026),
# ersatzForge; the same class names serve all three where they share an engine
BACKEND = [
    ("StableDiffusion3", "mmdit", "SD 3"),
    ("Flux", "flux", "Flux.1"),
    ("Flux2", "flux", "Flux.2"),
    ("Chroma", "chroma", "Chroma"),
    ("ChromaDCT", "chroma", "Chroma Radiance"),
    ("QwenImage", "qwen", "Qwen-Image"),
    ("QwenImage21", "qwen", "Qwen-Image"),
    ("Wan", "wan", "Wan"),
    ("ZImage", "nextdit", "Z-Image"),
    ("Lumina2", "nextdit", "Lumina 2"),
    ("Anima", "anima", "Anima"),
    ("ErnieImage", "ernie", "ERNIE-Image"),
    ("ERNIE", "ernie", "ERNIE-Image"),
    ("PiD", "pid", "PixelDiT"),
    ("Krea2", "krea", "Krea 2"),
]


def sampling(*parts):
    """ldm_patched's dynamic `ModelSampling` class made of a schedule class and a
    parameterization mixin (their names are what the check reads)."""
    bases = tuple(type(name, (), {}) for name in parts)
    return type("ModelSampling", bases, {})()


def ldm_patched(model_base, core, parts=("ModelSamplingDiscreteFlow", "CONST"), config=None):
    """A Forge Classic / reForge model: an ldm wrapper with Forge objects over a
    `model_base` class."""
    k_model = type(model_base, (nn.Module,), {})()
    k_model.diffusion_model = core
    k_model.model_sampling = sampling(*parts)
    k_model.model_config = type(config or model_base, (), {})()
    model = type("LatentDiffusion", (SimpleNamespace,), {"__module__": "ldm.models.diffusion"})(
        sd_checkpoint_info=SimpleNamespace(title="x.safetensors"))
    model.forge_objects = SimpleNamespace(unet=SimpleNamespace(model=k_model))
    return model


def a1111_sd3():
    """A1111 1.10's SD 3: `SD3Inferencer` over an MMDiT, with a flow table posing as ᾱ."""
    model = type("SD3Inferencer", (SimpleNamespace,), {})(
        model=SimpleNamespace(diffusion_model=NETS["mmdit"]()), parameterization="eps",
        model_type=SimpleNamespace(name="SD3"), is_sd3=True,
        sd_checkpoint_info=SimpleNamespace(title="sd3_medium.safetensors"))
    return model


def unet(make=sdxl_like, out_channels=None, in_channels=None):
    u = forge_like.forge_unet(make(0))
    if out_channels is not None:
        u.out_channels, u.in_channels = out_channels, in_channels or 4
    if in_channels is not None:
        u.in_channels = in_channels
    return u


# ---- the rule -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind, core, family", BACKEND, ids=[b[0] for b in BACKEND])
def test_every_backend_transformer_engine_is_refused_by_family(kind, core, family):
    with pytest.raises(FamRequestError) as e:
        check_model(engine(kind, NETS[core]()))
    assert str(e.value) == f"{NEEDS}{family} is a transformer model"


@pytest.mark.parametrize("model, message", [
    (lambda: ldm_patched("SD3", NETS["mmdit"]()), "SD 3 is a transformer model"),
    (lambda: ldm_patched("Flux", NETS["flux"](), ("ModelSamplingFlux", "CONST")),
     "Flux.1 is a transformer model"),
    (lambda: ldm_patched("HunyuanDiT", NETS["dit"](), ("ModelSamplingDiscrete", "V_PREDICTION", "EPS")),
     "Hunyuan-DiT is a transformer model"),
    (lambda: ldm_patched("SDXL", unet(out_channels=32), config="SDXL_flux2"),
     "SDXL on a Flux.2 latent is a UNet on a 32-channel latent"),
    (lambda: ldm_patched("SDXL", unet()), "SDXL is a flow-matching model"),
    (lambda: ldm_patched("SDXL", unet(), ("ModelSamplingContinuousEDM", "EDM", "V_PREDICTION", "EPS")),
     "SDXL uses an unsupported noise schedule (EDM/EPS/ModelSamplingContinuousEDM/V_PREDICTION)"),
    (lambda: ldm_patched("BaseModel", unet(sd1_like, in_channels=7), ("ModelSamplingDiscrete", "EPS"),
                         config="SD_X4Upscaler"),
     "SD_X4Upscaler is a UNet with 7 input channels"),
], ids=["sd3", "flux", "hunyuan", "sdxl-flux2-latent", "sdxl-flow", "sdxl-edm", "x4-upscaler"])
def test_ldm_patched_models_are_refused_by_structure(model, message):
    with pytest.raises(FamRequestError, match="^" + re.escape(NEEDS + message)):
        check_model(model())


@pytest.mark.parametrize("model, message", [
    (lambda: engine("Mugen", unet(out_channels=32), predictor()), "Mugen (SDXL flow) is a UNet on a 32-channel latent"),
    (lambda: engine("StableDiffusionXL", unet(), predictor()), "SDXL is a flow-matching model"),
    (lambda: engine("StableDiffusionXL", unet(), predictor("PredictionEDM", "edm")),
     "SDXL uses an unsupported noise schedule (PredictionEDM, edm)"),
    (lambda: engine("StableDiffusionXL", unet(), predictor("PredictionContinuousV", "v_prediction")),
     "SDXL uses an unsupported noise schedule (PredictionContinuousV, v_prediction)"),
], ids=["mugen", "sdxl-rectified-flow", "sdxl-edm", "sdxl-continuous-v"])
def test_backend_unets_on_other_latents_or_schedules_are_refused(model, message):
    with pytest.raises(FamRequestError) as e:
        check_model(model())
    assert str(e.value) == NEEDS + message


def test_an_engine_no_webui_has_yet_is_refused_by_structure():
    new = engine("HunyuanImage3", net("HunyuanTransformer", blocks=3), repo="tencent/HunyuanImage-3.0")
    with pytest.raises(FamRequestError, match="; tencent/HunyuanImage-3.0 is a transformer model$"):
        check_model(new)
    bare = engine("Sana2", net("SanaTransformer", blocks=1))
    with pytest.raises(FamRequestError, match="; Sana2 is a transformer model$"):
        check_model(bare)
    # a UNet-named engine on a transformer is still a transformer: the network decides
    posing = engine("StableDiffusionXL", NETS["flux"](), forge_like.Prediction(SIGMA_TABLE))
    with pytest.raises(FamRequestError, match="; SDXL is a transformer model$"):
        check_model(posing)


def test_a1111_sd3_is_refused():
    with pytest.raises(FamRequestError) as e:
        check_model(a1111_sd3())
    assert str(e.value) == f"{NEEDS}SD 3 is a transformer model"


@pytest.mark.parametrize("model", [
    lambda: engine("StableDiffusion", unet(sd1_like), forge_like.Prediction(SIGMA_TABLE)),
    lambda: engine("StableDiffusionXL", unet(), forge_like.Prediction(SIGMA_TABLE, "v_prediction")),
    lambda: ldm_patched("SDXL", unet(), ("ModelSamplingDiscrete", "V_PREDICTION", "EPS")),
    lambda: ldm_patched("BaseModel", unet(sd1_like, in_channels=9), ("ModelSamplingDiscrete", "EPS"),
                        config="SD15"),
    lambda: a1111_model(sd1_like(0), parameterization="eps"),
    lambda: a1111_model(sdxl_like(0), parameterization="v"),
    lambda: a1111_model(unet(sd1_like, in_channels=8), parameterization="eps"),
], ids=["forge-sd1", "forge-sdxl-v", "ldm-patched-sdxl-v", "ldm-patched-sd1-inpaint",
        "a1111-sd1", "a1111-sdxl-v", "a1111-instruct-pix2pix"])
def test_sd_unets_on_discrete_eps_or_v_schedules_are_accepted(model):
    check_model(model())


def test_a1111_x0_parameterization_is_refused():
    with pytest.raises(FamRequestError, match=r"SD 1.x uses an unsupported parameterization \(x0\)$"):
        check_model(a1111_model(sd1_like(0), parameterization="x0",
                                model_type=SimpleNamespace(name="SD1")))


def test_family_names_for_the_accepted_kinds():
    assert model_family(engine("StableDiffusionXLRefiner", unet())) == "SDXL Refiner"
    assert model_family(ldm_patched("SD21UNCLIP", unet(), config="SD20")) == "SD 2.x"
    assert model_family(a1111_model(sd1_like(0), model_type=SimpleNamespace(name="SSD"))) == "SSD-1B"


# ---- through the WebUI: 422 before anything is patched ------------------------------------------
@pytest.mark.parametrize("kind, core, family", BACKEND[:6] + BACKEND[-5:],
                         ids=[b[0] for b in BACKEND[:6] + BACKEND[-5:]])
@pytest.mark.parametrize("flavor", ["main", "neo", "ersatz"])
def test_forge_txt2img_on_a_transformer_is_a_422_and_nothing_is_patched(web, flavor, kind, core, family):
    model = engine(kind, NETS[core]())
    model.forge_objects_after_applying_lora = SimpleNamespace(unet=model.forge_objects.unet)
    options = dict(model.forge_objects.unet.model_options)
    p = forge_like.Txt2Img(web, model, [{"enabled": True}], flavor=flavor)
    with pytest.raises(FamRequestError) as e:
        web.process_images(p)
    assert str(e.value) == f"{NEEDS}{family} is a transformer model"
    assert e.value.status_code == 422 and not web.logged
    assert model.forge_objects.unet.model_options == options
    assert not {"sample", "sample_hr_pass", "_fam_generation"} & set(p.__dict__)


def test_a1111_txt2img_on_sd3_is_a_422(web):
    p = web.txt2img(a1111_sd3(), [{"enabled": True}])
    with pytest.raises(FamRequestError) as e:
        web.process_images(p)
    assert str(e.value) == f"{NEEDS}SD 3 is a transformer model" and e.value.status_code == 422
    assert not {"sample", "sample_hr_pass", "_fam_generation"} & set(p.__dict__)
