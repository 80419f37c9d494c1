"""v-prediction SDXL on a zero-terminal-SNR schedule in the miniature WebUIs (the real
script): A1111 rescales `sd_model.alphas_cumprod` for the batch ("Noise schedule: Zero
Terminal SNR"), Forge calls `predictor.set_sigmas` for a `ztsnr` checkpoint, both right
before `p.sample`; the samplers start at σ_max ≈ 4518.76. FAM must read the table the
sampler uses, at that moment: the first and the last high-res steps are checked against
float64 (the re-noised reference, ρ, the FM'd latent, the native step AM takes)."""

import math

import pytest
import torch

import forge_like
from a1111_like import ALPHAS_CUMPROD, rescale_zero_terminal_snr, sd_model as a1111_model
from fam.guidance import FamRun
from fam.hosts.forge import forge_schedule, sampler_schedule
from fam.hosts.webui_args import FamRequestError
from fam.params import FamParams
from ldm_like import sd1_like, sd1_without_top_attention, sdxl_like
from test_a1111_script import fresh_log, image, web  # noqa: F401 - the same miniature WebUI
from test_forge import SIGMA_TABLE
from test_frequency import reference as fm_reference
from test_ztsnr import FM_ULPS, REF_ULPS, Spy, log_nearest64, max_ulps, noised64, t_reference

FAM = [{"enabled": True}]
ZTSNR = rescale_zero_terminal_snr(ALPHAS_CUMPROD.float())       # float32, as the WebUIs
SIGMA_MAX = float(((1 - ZTSNR[-1]) / ZTSNR[-1]).sqrt())        # 4518.76


def fam_info(info):
    return {k: v for k, v in info.items() if k.startswith("FAM")}


def a1111_vpred_xl(dtype):
    return a1111_model(sdxl_like(0).to(dtype), is_sdxl=True, parameterization="v",
                       alphas_cumprod_original=ALPHAS_CUMPROD.float())


def forge_vpred_xl(dtype, flavor):
    patcher = forge_like.NeoUnetPatcher if flavor == "neo" else forge_like.UnetPatcher
    unet = forge_like.forge_unet(sdxl_like(0)).to(dtype)
    return forge_like.sd_model(unet, SIGMA_TABLE.clone(), kind="StableDiffusionXL",
                               patcher=patcher, is_sdxl=True,
                               predictor=forge_like.Prediction(SIGMA_TABLE.clone(), "v_prediction"))


def check_first_and_last_steps(spy, native_hw):
    """The high-res pass against float64 at its first (σ_max) and last steps."""
    assert spy.fm[0]["sigma"] == pytest.approx(SIGMA_MAX, rel=1e-6)
    assert spy.schedule.sigma_max == pytest.approx(SIGMA_MAX, rel=1e-6)   # the ZTSNR table
    for k in (0, -1):
        step = spy.fm[k]
        sigma = step["sigma"]
        assert torch.isfinite(step["before"]).all() and torch.isfinite(step["after"]).all()
        rho = t_reference(ZTSNR, sigma) / 1000
        assert spy.schedule.rho(sigma) == pytest.approx(rho, abs=1e-6)
        dtype = step["after"].dtype
        assert max_ulps(step["ref"], noised64(spy.z0, spy.eps, sigma, spy.vp), dtype) <= REF_ULPS[dtype]
        fm64 = fm_reference(step["before"].double(), step["ref"].double(), rho, native_hw, 0.5)
        assert max_ulps(step["after"], fm64, dtype) <= FM_ULPS[dtype]
        hires_sigma, chosen = spy.maps[k]
        assert hires_sigma == sigma and chosen == log_nearest64(spy.native, sigma)
    assert spy.maps[0][1] == max(spy.native) == pytest.approx(SIGMA_MAX, rel=1e-6)
    assert spy.fm[0]["sigma"] == pytest.approx(SIGMA_MAX, rel=1e-6)
    assert rho_first(spy) == pytest.approx(0.999, abs=1e-6)


def rho_first(spy):
    return spy.schedule.rho(spy.fm[0]["sigma"])


# ---- A1111 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_a1111_vpred_ztsnr_sdxl_hires_fix(web, monkeypatch, dtype):
    """The UNet in `dtype` (A1111's half-precision UNet), the sampler's latent in float32."""
    model = a1111_vpred_xl(dtype)
    plain = web.process_images(web.txt2img(model, [], ztsnr=True, steps=3))
    spy = Spy(monkeypatch)
    out = web.process_images(web.txt2img(model, FAM, ztsnr=True, steps=3))
    image, info = out.samples[0], out.infotexts[0]
    assert torch.isfinite(image).all() and (image - plain.samples[0]).abs().max() > 1e-3
    assert fam_info(info) == FamParams(enabled=True).to_infotext()      # no skip, no note
    assert len(spy.fm) == 3 and len(spy.native) == 3
    check_first_and_last_steps(spy, (8, 8))
    assert torch.equal(model.alphas_cumprod, ALPHAS_CUMPROD.float())      # A1111 put it back


def test_a1111_reads_the_table_of_the_batch_not_the_original(web, monkeypatch):
    """ZTSNR off: the plain table (σ_max 14.6), read from the same model object."""
    model = a1111_vpred_xl(torch.float32)
    spy = Spy(monkeypatch)
    web.process_images(web.txt2img(model, FAM, steps=3))
    assert spy.schedule.sigma_max == pytest.approx(14.6146, rel=1e-4)
    assert spy.fm[0]["sigma"] == pytest.approx(14.6146, rel=1e-4)


def test_a1111_downcast_and_ztsnr_together_are_refused_naming_both(web):
    model = a1111_vpred_xl(torch.float32)
    p = web.txt2img(model, FAM, ztsnr=True, downcast=True, steps=3)
    with pytest.raises(FamRequestError, match="Downcast alphas_cumprod.*Zero Terminal SNR") as e:
        web.process_images(p)
    assert e.value.status_code == 422 and not web.logged
    assert not {"sample", "sample_hr_pass", "_fam_generation"} & set(p.__dict__)


def test_a1111_downcast_alone_runs_on_the_fp16_table(web, monkeypatch):
    model = a1111_model(sd1_like(0), alphas_cumprod_original=ALPHAS_CUMPROD.float())
    spy = Spy(monkeypatch)
    out = web.process_images(web.txt2img(model, FAM, downcast=True))
    assert fam_info(out.infotexts[0]) == FamParams(enabled=True).to_infotext()
    assert spy.schedule.sigma_max == pytest.approx(14.6146, rel=1e-3)


# ---- Forge -----------------------------------------------------------------------------------
@pytest.mark.parametrize("flavor", ["main", "neo", "ersatz"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_forge_vpred_ztsnr_sdxl_hires_fix(web, monkeypatch, dtype, flavor):
    model = forge_vpred_xl(dtype, flavor)
    kw = dict(ztsnr=True, steps=3, flavor=flavor)
    plain = web.process_images(forge_like.Txt2Img(web, model, [], **kw))
    spy = Spy(monkeypatch)
    out = web.process_images(forge_like.Txt2Img(web, model, FAM, **kw))
    image, info = out.samples[0], out.infotexts[0]
    assert torch.isfinite(image).all() and (image - plain.samples[0]).abs().max() > 1e-3
    assert fam_info(info) == FamParams(enabled=True).to_infotext()
    assert len(spy.fm) == 3 and len(spy.native) == 3
    check_first_and_last_steps(spy, (8, 8))
    predictor = model.forge_objects_after_applying_lora.unet.model.predictor
    assert torch.equal(predictor.sigmas, SIGMA_TABLE)                      # Forge put it back


def test_forge_a1111_and_diffusers_sigma_tables_agree():
    """The stand-ins' ZTSNR tables are the WebUIs': σ_max 4518.76 in float32 both ways."""
    assert SIGMA_MAX == pytest.approx(4518.76, abs=0.05)
    rescaled = rescale_zero_terminal_snr(1 / (1 + SIGMA_TABLE * SIGMA_TABLE))
    assert float(((1 - rescaled[-1]) / rescaled[-1]).sqrt()) == pytest.approx(SIGMA_MAX, rel=1e-5)


def test_classic_follows_the_samplers_table_not_model_sampling():
    """Forge Classic's sampler is A1111's, built from `sd_model.alphas_cumprod`, and its ZTSNR
    rescales only that table: FAM follows it, not the UNet's plain `model_sampling`."""
    classic = forge_like.sd_model(forge_like.forge_unet(sd1_like(0)), SIGMA_TABLE)
    assert type(classic).__module__ != "backend"
    classic.alphas_cumprod = ZTSNR
    k_model = classic.forge_objects.unet.model
    assert forge_schedule(k_model).sigma_max == pytest.approx(14.6146, rel=1e-4)
    assert sampler_schedule(classic).sigma_max == pytest.approx(SIGMA_MAX, rel=1e-6)
    engine = forge_like.sd_model(forge_like.forge_unet(sd1_like(0)), SIGMA_TABLE)
    type(engine).__module__ = "backend.diffusion_engine.sd15"
    engine.alphas_cumprod = ZTSNR                       # not what backend/ samples with
    assert sampler_schedule(engine).sigma_max == pytest.approx(14.6146, rel=1e-4)


def test_sigma_max_latents_stay_finite_through_a_half_precision_unet():
    """The model input at σ_max is x/√(σ²+1) in float32 before the cast: the v model's
    output and x₀ are finite with a float16 UNet, and no σ² is formed in fp16."""
    unet = forge_like.forge_unet(sdxl_like(0)).half()
    k_model = forge_like.KModel(unet, SIGMA_TABLE, forge_like.Prediction(SIGMA_TABLE, "v_prediction"))
    k_model.predictor.set_sigmas(((1 - ZTSNR) / ZTSNR).sqrt())
    x = torch.randn(1, 4, 8, 8) * SIGMA_MAX
    x0 = k_model.apply_model(x, torch.tensor([SIGMA_MAX]), torch.randn(1, 3, 8))
    assert x0.dtype == torch.float32 and torch.isfinite(x0).all()
    assert math.isinf(float(torch.tensor(SIGMA_MAX, dtype=torch.float16) ** 2))   # why


# ---- img2img: the recompute path from σ_max -----------------------------------------------------
@pytest.mark.parametrize("host", ["a1111", "forge-main", "forge-neo"])
def test_img2img_upscaling_of_a_vpred_ztsnr_model_on_the_recompute_path(web, monkeypatch, host):
    """A v-prediction model (the SD1 layout, native 512²) on the ZTSNR schedule, img2img to
    520² with FAM (full re-noise: the pass starts at σ_max): the input image re-noised at
    4518.76 as the native reference, finite, AM on every high-res call."""
    unet = sd1_without_top_attention()
    kw = dict(init_images=[image()], width=520, height=520, ztsnr=True, steps=2)
    if host == "a1111":
        model = a1111_model(unet, parameterization="v",
                            alphas_cumprod_original=ALPHAS_CUMPROD.float())
        make = lambda args: web.img2img(model, args, **kw)   # noqa: E731
    else:
        flavor = host.split("-")[1]
        patcher = forge_like.NeoUnetPatcher if flavor == "neo" else forge_like.UnetPatcher
        model = forge_like.sd_model(
            forge_like.forge_unet(unet), SIGMA_TABLE.clone(), patcher=patcher,
            predictor=forge_like.Prediction(SIGMA_TABLE.clone(), "v_prediction"))
        make = lambda args: forge_like.Img2Img(web, model, args, flavor=flavor, **kw)   # noqa: E731
    ready_maps = FamRun._ready_maps
    spy = Spy(monkeypatch)
    monkeypatch.setattr(FamRun, "_ready_maps", ready_maps)   # no native record to spy on here
    out = web.process_images(make(FAM))
    info = out.infotexts[0]
    assert info["FAM AM path"] == "recompute" and not {"FAM AM skipped", "FAM note"} & set(info)
    assert torch.isfinite(out.samples[0]).all() and not web.logged
    assert spy.fm[0]["sigma"] == pytest.approx(SIGMA_MAX, rel=1e-6) and len(spy.fm) == 2
    sigma = spy.fm[0]["sigma"]
    ref64 = noised64(spy.z0, spy.eps, sigma, spy.vp)
    assert max_ulps(spy.fm[0]["ref"], ref64, torch.float32) <= REF_ULPS[torch.float32]
    plain = web.process_images(make([]))
    assert (out.samples[0] - plain.samples[0]).abs().max() > 1e-3
