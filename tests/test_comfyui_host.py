"""The ComfyUI host and its nodes at torch level, on the tiny ldm-named UNets of the Forge
tests driven by ComfyUI-shaped stand-ins (tests/comfy_like.py: the patcher and its model
wrappers, the KSampler path, the CFG batch, ControlNet objects). The Forge host on the same
weights gives the reference images: the same generation through both must agree."""

import inspect
import math
import os
import runpy
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import comfy_like
import forge_like
from a1111_like import BETAS, SCHEDULE, euler
from fam.hosts.comfyui import (ComfyHooks, FamComfyError, Sampling, check_sampler, hires_fix,
                               hires_pass, hires_size, model_kind)
from fam.hosts.comfyui_nodes import (NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS,
                                     fam_inputs)
from fam.guidance import FamRun
from fam.params import FamParamError, FamParams
from fam.record import Role
from ldm_like import sd1_like, sdxl_like
from test_forge import SIGMA_TABLE, forge_model, job, new_generation, reset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ON = FamParams(enabled=True)
NATIVE, HIRES = (8, 8), (16, 16)
STEPS, CFG = 4, 5.0


@pytest.fixture
def comfy(monkeypatch):
    return comfy_like.install(monkeypatch)


def comfy_model(make=sd1_like, **kw):
    return comfy_like.patcher(forge_like.forge_unet(make(0)), **kw)


def prompts(parts=1, seed=0, control=None, **extra):
    """(positive, negative) as CLIP Text Encode gives them: one [tensor, dict] per entry
    (several positive entries: Conditioning Combine)."""
    g = torch.Generator().manual_seed(seed)
    extra = dict(extra, control=control) if control is not None else extra
    positive = [[torch.randn(1, 3, 8, generator=g), dict(extra)] for _ in range(parts)]
    negative = [[torch.randn(1, 3, 8, generator=g), dict(extra)]]
    return positive, negative


def run_fix(model, params=ON, batch=1, sampler="euler", scheduler="simple", seed=1, conds=None,
            cfg=CFG, hires_denoise=1.0, **kw):
    positive, negative = conds or prompts()
    latent = {"samples": torch.zeros(batch, 4, *NATIVE)}
    return hires_fix(model, latent, Sampling(positive, negative, seed, cfg, sampler, scheduler),
                     STEPS, 1.0, 2.0, 0, hires_denoise, params, **kw)


def run_pass(model, native, params=ON, sampler="euler", seed=1, conds=None):
    positive, negative = conds or prompts()
    return hires_pass(model, {"samples": native}, Sampling(positive, negative, seed, CFG, sampler,
                                                           "simple"), STEPS, 2.0, 1.0, params)


def forge_run(make, params, batch, comfy, reference=None):
    """The same generation through the Forge host: the start latents ComfyUI makes (noise
    of each pass's seed, √(1+σ₀²)-scaled at full denoise), Forge's CFG batch and patcher."""
    model = forge_model(make)
    base = model.forge_objects.unet
    positive, negative = prompts()
    cond = SimpleNamespace(batch=[[positive[0][0][0]]] * batch)
    uncond = negative[0][0].expand(batch, -1, -1)
    sig = comfy_like.calculate_sigmas(SimpleNamespace(sigmas=SIGMA_TABLE, sigma_min=SIGMA_TABLE[0],
                                                      sigma_max=SIGMA_TABLE[-1]), "simple", STEPS)
    start = math.sqrt(1 + float(sig[0]) ** 2)
    noise_n = comfy.prepare_noise(torch.zeros(batch, 4, *NATIVE), 1)
    noise_h = comfy.prepare_noise(torch.zeros(batch, 4, *HIRES), 1)
    gen = new_generation(model, params)
    p, sampler = job(model, batch)
    try:
        with torch.no_grad():
            sampler.model_wrap_cfg = forge_like.CFGDenoiser(model)
            if reference is None:
                gen.record_native(p, sampler, vp=False)
                native = euler(sampler.model_wrap_cfg, noise_n * start, sig, cond, uncond, CFG)
            else:
                native = reference
            z0 = F.interpolate(native, size=HIRES, mode="bicubic", align_corners=False)
            reset(model, base)
            hires = SimpleNamespace(func=None, model_wrap_cfg=forge_like.CFGDenoiser(model))
            gen.guide_hires(p, hires, z0, noise_h, False, reference=reference)
            out = euler(hires.model_wrap_cfg, z0 + noise_h * start, sig, cond, uncond, CFG)
        return SimpleNamespace(native=native, hires=out, run=gen.run)
    finally:
        gen.remove()


# ---- which models --------------------------------------------------------------------------
def ztsnr_sigmas():
    """The WebUIs' zero-terminal-SNR table (ᾱ_T pinned), σ_max 4518.76."""
    ac = torch.cumprod(1 - BETAS, 0)
    s = ac.sqrt()
    s = (s - s[-1]) * s[0] / (s[0] - s[-1])
    ac = s ** 2
    ac[-1] = 4.8973451890853435e-08
    return ((1 - ac) / ac).sqrt().float()


@pytest.mark.parametrize("config, sampling, sdxl, family", [
    ("SD15", comfy_like.sampling(), False, "SD1.x"),
    ("SD20", comfy_like.sampling(comfy_like.ModelSamplingDiscrete, comfy_like.V_PREDICTION), False,
     "SD2.x"),
    ("SDXL", comfy_like.sampling(comfy_like.ModelSamplingDiscrete, comfy_like.V_PREDICTION,
                                 sigmas=ztsnr_sigmas()), True, "SDXL"),
    ("SSD1B", comfy_like.sampling(), True, "SSD-1B (SDXL)")], ids=["sd15", "sd2v", "sdxl-v-ztsnr", "ssd1b"])
def test_sd_unets_on_discrete_eps_or_v_schedules_are_accepted(config, sampling, sdxl, family):
    make = sdxl_like if sdxl else sd1_like
    kind = model_kind(comfy_model(make, config=config, model_sampling=sampling, sdxl=sdxl))
    assert (kind.family, kind.sdxl) == (family, sdxl)
    assert kind.schedule.sigma_max == pytest.approx(float(sampling.sigmas[-1]), rel=1e-6)
    assert len(kind.layout.am_layers()) == (9 if sdxl else 3)


def test_a_model_sampling_node_patch_is_what_counts():
    """ModelSamplingDiscrete (v_prediction, zsnr) patches the object a sampler reads."""
    model = comfy_model()
    model.add_object_patch("model_sampling", comfy_like.sampling(
        comfy_like.ModelSamplingDiscrete, comfy_like.V_PREDICTION, sigmas=ztsnr_sigmas()))
    assert model_kind(model).schedule.sigma_max == pytest.approx(4518.76, rel=1e-5)
    model.add_object_patch("model_sampling", comfy_like.sampling(
        comfy_like.named("ModelSamplingDiscreteDistilled", comfy_like.ModelSamplingDiscrete),
        comfy_like.named("LCM", comfy_like.EPS)))
    with pytest.raises(FamComfyError, match=r"SD1.x model samples with "
                                            r"ModelSamplingDiscreteDistilled \(LCM\)"):
        model_kind(model)


def _with_channels(c_in, c_out):
    unet = forge_like.forge_unet(sd1_like(0))
    unet.in_channels, unet.out_channels = c_in, c_out
    return unet


@pytest.mark.parametrize("build, message", [
    (lambda: comfy_like.patcher(torch.nn.Linear(4, 4), config="Flux"),
     "needs an SD1.x/SD2.x/SDXL UNet model; Flux.1 is a transformer model \\(input 'model'\\)"),
    (lambda: comfy_like.patcher(torch.nn.Linear(4, 4), config="Kandinsky5"),
     "Kandinsky5 is a transformer model"),
    (lambda: comfy_model(config="SDXLRefiner"), "SDXL Refiner is a refiner: use FAM with the "
                                               "SDXL base model"),
    (lambda: comfy_model(config="SD15_instructpix2pix"), "SD1.5 instruct-pix2pix is an "
                                                         "image-editing model"),
    (lambda: comfy_like.patcher(_with_channels(8, 4), config="NewEdit"),
     "NewEdit is an image-conditioned UNet \\(8 input channels\\)"),
    (lambda: comfy_like.patcher(_with_channels(4, 32), config="SDXL_flux2"),
     "SDXL_flux2 uses a 32-channel latent"),
    (lambda: comfy_model(config="Future"), "Future is another kind of model \\(BaseModel\\)"),
    (lambda: comfy_model(config="SDXL", model_sampling=comfy_like.sampling(
        comfy_like.named("ModelSamplingContinuousEDM", torch.nn.Module),
        comfy_like.named("EDM", comfy_like.V_PREDICTION))),
     "needs a discrete ε- or v-prediction noise schedule; this SDXL model samples with "
     "ModelSamplingContinuousEDM \\(EDM\\)"),
    (lambda: comfy_model(model_sampling=comfy_like.sampling(
        comfy_like.named("ModelSamplingDiscreteFlow", torch.nn.Module),
        comfy_like.named("CONST"))), "ModelSamplingDiscreteFlow \\(CONST, flow matching\\)"),
], ids=["flux", "unknown-transformer", "refiner", "ip2p", "8-channels", "32-channels",
        "unknown-unet", "edm", "flow"])
def test_every_other_model_is_refused_by_type_naming_its_family(build, message):
    with pytest.raises(FamComfyError, match=message):
        model_kind(build())


def test_a_comfyui_without_model_wrappers_is_refused():
    old = forge_like.UnetPatcher(comfy_like.BaseModel(forge_like.forge_unet(sd1_like(0))))
    with pytest.raises(FamComfyError, match="needs a ComfyUI with model wrappers"):
        model_kind(old)


def test_samplers_fm_cannot_reach_and_bad_scales_are_refused_by_name():
    check_sampler("uni_pc")
    with pytest.raises(FamComfyError, match="cannot guide sampler 'sa_solver'.*input 'sampler_name'"):
        check_sampler("sa_solver")
    assert hires_size((7, 9), 1.5) == (10, 14) and hires_size((64, 64), 4) == (256, 256)
    for scale in (1.4, 4.1):
        with pytest.raises(FamComfyError, match="1.5 to 4.*input 'scale'"):
            hires_size((8, 8), scale)
    with pytest.raises(FamComfyError, match="20480x20480 image, larger than ComfyUI's 16384 px"):
        hires_size((640, 640), 4)


def test_row_roles_follow_the_conds_place_in_its_list(comfy):
    hooks = ComfyHooks(SimpleNamespace(), (), None)
    a, b, n = (object() for _ in range(3))   # ComfyUI's uuid.UUID: hashable, by identity
    guider = SimpleNamespace(conds={"positive": [{"uuid": a}, {"uuid": b}],
                                    "negative": [{"uuid": n}]})
    hooks._follow(guider)

    def args(kinds, uuids):
        return {"cond_or_uncond": kinds, "c": {"transformer_options": {"uuids": uuids}}}

    assert hooks._roles(args([1, 0], [n, b]), 4) == [Role(0, True), Role(1, True),
                                                      Role(0, False, 1), Role(1, False, 1)]
    assert hooks._roles(args([0], [a]), 1) == [Role(0)]
    assert hooks._roles(args([2], [a]), 1) == []            # a third branch: no roles, skipped
    assert hooks._roles(args([0, 0], [a, "?"]), 2) == [Role(0), Role(0, False, 1)]   # counted


# ---- end to end against the Forge host --------------------------------------------------------
@pytest.mark.parametrize("make, config", [(sd1_like, "SD15"), (sdxl_like, "SDXL")],
                         ids=["sd1", "sdxl"])
def test_comfyui_and_forge_hosts_agree(comfy, make, config):
    model = comfy_model(make, config=config)
    hires, native = run_fix(model, batch=2)
    ref = forge_run(make, ON, 2, comfy)
    scale = comfy_like.LatentFormat.scale_factor
    torch.testing.assert_close(native["samples"] * scale, ref.native, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(hires["samples"] * scale, ref.hires, atol=1e-4, rtol=1e-4)
    assert ref.run.am_calls > 0 and not ref.run.am_skipped
    plain, _ = run_fix(model, FamParams(), batch=2)
    assert (plain["samples"] - hires["samples"]).abs().max() > 1e-2


def test_reference_path_agrees_with_forges(comfy):
    native = torch.randn(2, 4, *NATIVE, generator=torch.Generator().manual_seed(5))
    hires = run_pass(comfy_model(), native)
    scale = comfy_like.LatentFormat.scale_factor
    ref = forge_run(sd1_like, ON, 2, comfy, reference=native * scale)
    assert ref.run.replays > 0
    torch.testing.assert_close(hires["samples"] * scale, ref.hires, atol=1e-4, rtol=1e-4)


def test_fam_off_is_the_plain_two_ksampler_hires_fix(comfy):
    model = comfy_model()
    positive, negative = prompts()
    hires, native = run_fix(model, FamParams(), batch=2, conds=(positive, negative),
                            hires_denoise=0.6)
    import comfy.sample as sample   # the stand-in: KSampler, Upscale Latent By, KSampler
    empty = torch.zeros(2, 4, *NATIVE)
    first = sample.sample(model, sample.prepare_noise(empty, 1), STEPS, CFG, "euler", "simple",
                          positive, negative, empty)
    up = F.interpolate(first, size=HIRES, mode="bicubic", align_corners=False)
    second = sample.sample(model, sample.prepare_noise(up, 1), STEPS, CFG, "euler", "simple",
                           positive, negative, up, denoise=0.6)
    assert torch.equal(native["samples"], first) and torch.equal(hires["samples"], second)


@pytest.mark.parametrize("batch, parts, max_chunks, cfg", [
    (2, 1, 1, CFG), (1, 2, None, CFG), (1, 2, 1, CFG), (2, 2, 2, CFG), (2, 1, None, 1.0)],
    ids=["split", "combine", "combine-split", "batch-combine-split", "cfg1"])
def test_every_row_layout_is_guided_with_its_own_roles(comfy, batch, parts, max_chunks, cfg):
    model = comfy_model()
    conds = prompts(parts)
    whole, _ = run_fix(model, batch=batch, conds=conds, cfg=cfg)
    comfy_like.Guider.max_chunks = max_chunks
    comfy_like.Guider.calls.clear()
    split, _ = run_fix(model, batch=batch, conds=conds, cfg=cfg)
    chunks = [len(kinds) for kinds, _ in comfy_like.Guider.calls]
    assert max(chunks) == min(max_chunks or 99, parts + (cfg != 1.0))
    # 1e-4 of the Forge test in the sampler's units is 2e-4 in the graph's (scale factor 0.5)
    torch.testing.assert_close(split["samples"], whole["samples"], atol=2e-4, rtol=1e-4)
    plain, _ = run_fix(model, FamParams(), batch=batch, conds=conds, cfg=cfg)
    assert (plain["samples"] - split["samples"]).abs().max() > 1e-2


def test_record_and_recompute_paths_agree_with_a_controlnet(comfy):
    """The UNet consumes a call's ControlNet residuals: a replayed native call gets new ones."""
    comfy_like.SKIPPED_CONTROL[0] = 0
    control = comfy_like.Control(torch.rand(1, 3, 64, 64), channels=32)
    conds = prompts(control=control)
    model = comfy_model()
    rec, _ = run_fix(model, conds=conds)
    rep, _ = run_fix(model, ON.replace(record_budget_mb=0), conds=conds)
    assert torch.equal(rec["samples"], rep["samples"])
    no_control, _ = run_fix(model, conds=prompts())
    assert (no_control["samples"] - rec["samples"]).abs().max() > 1e-3
    assert NATIVE in control.calls and HIRES in control.calls
    assert comfy_like.SKIPPED_CONTROL[0] == 0


def test_reference_path_gives_native_size_calls_native_controlnet_residuals(comfy):
    comfy_like.SKIPPED_CONTROL[0] = 0
    control = comfy_like.Control(torch.rand(1, 3, 64, 64), channels=32)
    native = torch.randn(1, 4, *NATIVE, generator=torch.Generator().manual_seed(5))
    out = run_pass(comfy_model(), native, conds=prompts(control=control))
    assert control.calls.count(NATIVE) == STEPS and control.calls.count(HIRES) == STEPS
    assert comfy_like.SKIPPED_CONTROL[0] == 0 and torch.isfinite(out["samples"]).all()


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2m", "uni_pc"])
def test_every_sampler_is_guided(comfy, sampler):
    model = comfy_model()
    hires, _ = run_fix(model, sampler=sampler, scheduler="karras")
    plain, _ = run_fix(model, FamParams(), sampler=sampler, scheduler="karras")
    assert torch.isfinite(hires["samples"]).all()
    assert (plain["samples"] - hires["samples"]).abs().max() > 1e-2


def test_unipc_callback_edits_its_vp_latent_as_fm_edits_the_sigma_space_one(comfy):
    """What the next UniPC step starts from is FM'd at the σ it is at (VP units)."""
    run = FamRun(ON, (), SCHEDULE)
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(1, 4, *HIRES, generator=g), torch.randn(1, 4, *HIRES, generator=g)
    run.begin_hires(z0, eps, reference_native_hw=NATIVE)
    hooks = ComfyHooks(run, (), None)
    sigmas = torch.tensor([14.6, 4.0, 1.2, 0.3, 0.0])
    seen = []
    guided = hooks._guided_callback(lambda *a: seen.append(a[0]), sigmas)
    for step in range(4):
        x_vp = torch.randn(1, 4, *HIRES, generator=g)
        scale = math.sqrt(1 + float(sigmas[step]) ** 2)
        expect = x_vp * scale
        run.guide_latent(expect, float(sigmas[step]))
        kept = x_vp.clone()
        guided(step, None, x_vp, 4)
        if step < 3:
            torch.testing.assert_close(x_vp, expect / scale, atol=1e-6, rtol=1e-5)
        else:   # after the last step: the finished latent is left alone
            assert torch.equal(x_vp, kept)
    assert seen == [0, 1, 2, 3]


def test_the_callers_model_is_never_changed_and_plain_runs_after_are_identical(comfy):
    model = comfy_model()
    foreign = lambda n, c, v, extra: (n, c, v)   # noqa: E731 - another node's attn1 patch
    model.set_model_attn1_patch(foreign)
    seen = []

    def wrapper(apply_model, args):              # another node's UNet function wrapper
        seen.append(1)
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(wrapper)
    before = model.state()
    plain, _ = run_fix(model, FamParams())
    n_plain = len(seen)
    fam, _ = run_fix(model)
    assert len(seen) == 2 * n_plain             # FAM's clones keep it in the chain
    assert model.state() == before
    again, _ = run_fix(model, FamParams())
    assert torch.equal(again["samples"], plain["samples"])
    assert not torch.equal(fam["samples"], plain["samples"])


def test_an_interrupted_run_leaves_nothing_behind(comfy):
    model = comfy_model()
    before = model.state()
    plain, _ = run_fix(model, FamParams())
    for at in (2, 6):      # in the native pass, in the high-res pass
        comfy.interrupt_at, comfy.progress = at, []
        with pytest.raises(comfy_like.InterruptProcessingException):
            run_fix(model, ON.replace(record_budget_mb=0 if at == 6 else 8192))
        comfy.interrupt_at = None
        assert model.state() == before
        assert torch.equal(run_fix(model, FamParams())[0]["samples"], plain["samples"])


def test_one_progress_bar_spans_both_passes(comfy):
    run_fix(comfy_model())
    assert comfy.progress == [(i, 2 * STEPS) for i in range(1, 2 * STEPS + 1)]
    assert comfy.sampled == ["euler", "euler"]


def test_calls_on_an_area_pass_through(comfy, caplog):
    positive, negative = prompts(2)
    positive[1][1]["area"] = (4, 4, 0, 0)       # latent cells: height, width, top, left
    out, _ = run_fix(comfy_model(), conds=(positive, negative))
    areas = [hw for _, hw in comfy_like.Guider.calls if hw == (4, 4)]
    assert len(areas) == 2 * STEPS and torch.isfinite(out["samples"]).all()
    assert f"{2 * STEPS} UNet calls on part of the latent" in caplog.text


def test_sdxl_native_size_calls_say_the_native_size(comfy, monkeypatch):
    """Reference path: SDXL's `y` of a native-size call carries the native height and width."""
    model = comfy_model(sdxl_like, config="SDXL", sdxl=True)
    sizes = []
    apply_model = model.model.apply_model

    def spy(x, t, y=None, **kw):
        sizes.append((tuple(x.shape[-2:]), tuple(y[0, 8:12].tolist())))
        return apply_model(x, t, y=y, **kw)

    monkeypatch.setattr(model.model, "apply_model", spy)
    native = torch.randn(1, 4, *NATIVE, generator=torch.Generator().manual_seed(5))
    run_pass(model, native, conds=prompts(pooled_output=torch.randn(1, 4)))
    expect = {hw: tuple(comfy_like.embed(torch.tensor([8.0 * hw[1]]))[0].tolist())
              for hw in (NATIVE, HIRES)}
    assert {hw for hw, _ in sizes} == {NATIVE, HIRES}
    for hw, width in sizes:
        assert width == pytest.approx(expect[hw], abs=1e-6)


def test_v_prediction_with_zero_terminal_snr_runs_from_sigma_max(comfy):
    model = comfy_model(config="SD20", model_sampling=comfy_like.sampling(
        comfy_like.ModelSamplingDiscrete, comfy_like.V_PREDICTION, sigmas=ztsnr_sigmas()))
    hires, native = run_fix(model, scheduler="karras")
    plain, _ = run_fix(model, FamParams(), scheduler="karras")
    assert torch.isfinite(hires["samples"]).all() and torch.isfinite(native["samples"]).all()
    assert (plain["samples"] - hires["samples"]).abs().max() > 1e-3


def test_unusable_inputs_are_refused_naming_them(comfy):
    model = comfy_model()
    sampling = Sampling(*prompts(), 1, CFG, "euler", "simple")
    with pytest.raises(FamComfyError, match="noise mask.*input 'latent_image'"):
        hires_fix(model, {"samples": torch.zeros(1, 4, 8, 8), "noise_mask": torch.ones(8, 8)},
                  sampling, STEPS, 1.0, 2.0, 0, 1.0, ON)
    with pytest.raises(FamComfyError, match="input 'latent'"):
        hires_pass(model, {"samples": torch.zeros(4, 8, 8)}, sampling, STEPS, 2.0, 1.0, ON)
    with pytest.raises(FamComfyError, match="blocks \\[1\\] have no self-attention in SD1.x.*"
                                            "input 'am_blocks'"):
        run_fix(model, ON.replace(am_blocks="1"))
    with pytest.raises(FamComfyError, match="Flux.1 is a transformer model"):
        run_fix(comfy_like.patcher(torch.nn.Linear(4, 4), config="Flux"))
    assert not comfy.sampled   # refused before anything ran


# ---- the nodes -------------------------------------------------------------------------------
def test_node_widgets_are_famparams_settings(comfy):
    spec = fam_inputs()
    assert list(spec) == FamParams.names()
    for f in FamParams.__dataclass_fields__.values():
        kind, opts = spec[f.name]
        assert opts["default"] == (True if f.name == "enabled" else f.default)
        assert f.metadata["label"] in opts["tooltip"]
        if kind in ("INT", "FLOAT"):
            assert (opts["min"], opts["max"], opts["step"]) == (
                f.metadata["minimum"], f.metadata["maximum"], f.metadata["step"])
    for name in ("FAMHiresSampler", "FAMHiresPass", "FAMSettings"):
        inputs = NODE_CLASS_MAPPINGS[name].INPUT_TYPES()
        assert all(inputs["required"][k] == v for k, v in spec.items())
    sampler = NODE_CLASS_MAPPINGS["FAMHiresSampler"].INPUT_TYPES()["required"]
    assert "sa_solver" not in sampler["sampler_name"][0] and "uni_pc" in sampler["sampler_name"][0]
    assert sampler["scale"][1]["min"] == 1.5 and sampler["scale"][1]["max"] == 4.0
    assert NODE_DISPLAY_NAME_MAPPINGS["FAMHiresSampler"] == "FAM Hires Sampler"


def test_validation_names_only_the_input_comfyui_cannot_check_itself():
    """ComfyUI skips its own range and list checks of every input VALIDATE_INPUTS names."""
    for node in NODE_CLASS_MAPPINGS.values():
        assert inspect.getfullargspec(node.VALIDATE_INPUTS).args == ["cls", "am_blocks"]
        assert node.VALIDATE_INPUTS(am_blocks="3, 4") is True
        assert node.VALIDATE_INPUTS(am_blocks=None) is True      # linked: checked when it runs
        assert node.VALIDATE_INPUTS(am_blocks="up").startswith("FAM setting 'am_blocks' = 'up'")


def test_nodes_delegate_and_linked_settings_replace_the_widgets(comfy):
    nodes = {k: v() for k, v in NODE_CLASS_MAPPINGS.items()}
    widgets = {k: v[1]["default"] for k, v in fam_inputs().items()}
    (settings,) = nodes["FAMSettings"].settings(**{**widgets, "am_lambda": 0.0})
    assert settings == FamParams(enabled=True, am_lambda=0.0)
    with pytest.raises(FamParamError, match="'fm_cutoff' = 2.0"):
        nodes["FAMSettings"].settings(**{**widgets, "fm_cutoff": 2.0})
    model, (positive, negative) = comfy_model(), prompts()
    latent = {"samples": torch.zeros(1, 4, *NATIVE)}
    common = dict(model=model, positive=positive, negative=negative, seed=1, steps=2, cfg=CFG,
                  sampler_name="euler", scheduler="simple", scale=2.0)
    hires, native = nodes["FAMHiresSampler"].sample(
        latent_image=latent, denoise=1.0, hires_steps=0, hires_denoise=0.5,
        **{**widgets, "am_lambda": 0.3}, **common, fam_settings=settings)
    assert hires["samples"].shape == (1, 4, *HIRES) and native["samples"].shape == (1, 4, *NATIVE)
    (out,) = nodes["FAMHiresPass"].sample(latent=native, denoise=0.5, **widgets, **common)
    assert out["samples"].shape == (1, 4, *HIRES)
    with pytest.raises(FamParamError, match="fam_settings.*FAM Settings node"):
        nodes["FAMHiresPass"].sample(latent=native, denoise=0.5, fam_settings="x", **widgets,
                                     **common)


LOAD_ROOT = """
import importlib.util, sys
def load(name, root):
    spec = importlib.util.spec_from_file_location(name, root + "/__init__.py",
                                                  submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
"""


def test_comfyui_loads_the_folder_twice_without_importing_anything_heavy():
    """ComfyUI executes `<folder>/__init__.py` as a package named after the folder (a hyphen
    is fine), once per thread; the WebUIs never import it."""
    code = LOAD_ROOT + (
        f"a = load('sd-webui-fam', {ROOT!r}); b = load('sd-webui-fam', {ROOT!r})\n"
        "assert a.NODE_CLASS_MAPPINGS['FAMHiresSampler'] is b.NODE_CLASS_MAPPINGS['FAMHiresSampler']\n"
        "assert sorted(a.NODE_CLASS_MAPPINGS) == ['FAMHiresPass', 'FAMHiresSampler', 'FAMSettings']\n"
        "print(sorted(m for m in ('torch', 'comfy', 'numpy') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_root_run_as_a_plain_module_registers_nothing_and_does_not_fail():
    """pytest imports a checkout's root `__init__.py` without a package when the folder's
    name is no package name (e.g. `ci.1a2b`); only ComfyUI's package load registers nodes."""
    tables = runpy.run_path(os.path.join(ROOT, "__init__.py"))
    assert tables["NODE_CLASS_MAPPINGS"] == tables["NODE_DISPLAY_NAME_MAPPINGS"] == {}


def test_install_py_does_nothing_outside_a_webui():
    """ComfyUI-Manager runs install.py with ComfyUI's Python, which has no `launch`."""
    out = subprocess.run([sys.executable, "install.py"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""


# ---- the example workflows in docs/comfyui ---------------------------------------------------
DOCS = os.path.join(ROOT, "docs", "comfyui")
CORE_NODES = {"CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler",
              "VAEDecode", "VAEEncode", "SaveImage", "LoadImage", "ImageScale"}


def _workflows(suffix):
    return sorted(f for f in os.listdir(DOCS) if f.endswith(suffix))


@pytest.mark.parametrize("name", _workflows(".api.json"))
def test_api_workflows_give_every_fam_node_input_a_valid_value(comfy, name):
    """What ComfyUI's validation checks for the FAM nodes, on the shipped API workflows (the
    live tests run them); the nodes they link to are ComfyUI's core nodes."""
    import json
    with open(os.path.join(DOCS, name)) as f:
        wf = json.load(f)
    assert any(n["class_type"] in NODE_CLASS_MAPPINGS for n in wf.values())
    for node_id, node in wf.items():
        cls = NODE_CLASS_MAPPINGS.get(node["class_type"])
        if cls is None:
            assert node["class_type"] in CORE_NODES
            continue
        spec = cls.INPUT_TYPES()
        inputs = node["inputs"]
        assert set(inputs) - set(spec["required"]) <= set(spec.get("optional", {}))
        for key, (kind, *opts) in spec["required"].items():
            value = inputs[key]
            if isinstance(value, list):          # a link: [node id, output index]
                assert value[0] in wf
            elif isinstance(kind, list):   # the stand-in lists only a few of ComfyUI's
                assert value in kind or key in ("sampler_name", "scheduler"), (key, value)
            elif kind in ("INT", "FLOAT"):
                assert opts[0]["min"] <= value <= opts[0]["max"], (key, value)
        if "am_blocks" in inputs:
            assert cls.VALIDATE_INPUTS(am_blocks=inputs["am_blocks"]) is True


def test_ui_workflows_match_the_api_ones():
    """Each UI-format workflow (what the frontend loads) has the nodes of its API twin."""
    import json
    for name in _workflows(".ui.json"):
        with open(os.path.join(DOCS, name)) as f:
            ui = json.load(f)
        with open(os.path.join(DOCS, name.replace(".ui.json", ".api.json"))) as f:
            api = json.load(f)
        assert sorted(n["type"] for n in ui["nodes"]) == sorted(n["class_type"] for n in api.values())


def test_pyproject_has_the_comfy_registry_metadata():
    """What comfy-cli reads to publish: a node id and an X.Y.Z version by the registry's rules,
    and the [tool.comfy] keys (PublisherId stays empty until the publisher sets theirs)."""
    import re
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        meta = tomllib.load(f)
    project, comfy_table = meta["project"], meta["tool"]["comfy"]
    assert re.fullmatch(r"[A-Za-z](?:[A-Za-z0-9]|[-_.](?![-_.]))*", project["name"])
    assert len(project["name"]) < 100 and "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert comfy_table["DisplayName"].startswith("FAM Diffusion")
    assert isinstance(comfy_table["PublisherId"], str)
    assert project.get("urls", {}).get("Repository", "https://").startswith("https://")
