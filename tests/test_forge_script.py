"""scripts/fam_diffusion.py on the Forge flavours: `a1111_like.MiniWebUI` (the real script,
stand-in `modules`) running `forge_like` processing objects, whose hooks come in the order
and with the UNet resets of Forge main, Forge Neo, ersatzForge, Forge Classic and reForge.
The A1111 miniature on the same weights is the reference."""

import copy
import types

import pytest
import torch

import forge_like
from a1111_like import MiniWebUI, sd_model as a1111_model
from fam.hosts.unet_hooks import GEN_ATTR
from fam.hosts.webui_args import FamRequestError
from fam.params import FamParams
from ldm_like import sd1_like, sd1_without_top_attention, sdxl_like
from test_a1111_script import fresh_log, image, web  # noqa: F401 - the same miniature WebUI
from test_forge import SIGMA_TABLE

FAM = [{"enabled": True}]
FLAVORS = ["main", "neo", "ersatz", "classic", "reforge"]
BACKEND = ["main", "neo", "ersatz"]     # the `backend/` Forges, with Hires CFG


def forge_model(make=sd1_like, title="tiny.safetensors", flavor="main", **flags):
    patcher = forge_like.NeoUnetPatcher if flavor == "neo" else forge_like.UnetPatcher
    return forge_like.sd_model(forge_like.forge_unet(make(0)), SIGMA_TABLE, title=title,
                               patcher=patcher, **flags)


def txt2img(web, model, args=FAM, **kw):
    return forge_like.Txt2Img(web, model, args, **kw)


def run(web, p):
    out = web.process_images(p)
    return out.samples[0], out.infotexts[0]


def fam_info(info):
    return {k: v for k, v in info.items() if k.startswith("FAM")}


def options(patcher):
    """A patcher's options less the σ schedule Forge Neo's sampler writes into it."""
    opts = copy.deepcopy(patcher.model_options)
    opts.get("transformer_options", {}).pop("sampling_sigmas", None)
    return opts


def base_state(model):
    base = model.forge_objects_after_applying_lora.unet
    return base, (options(base), base.extra_preserved_memory_during_sampling)


def has_fam(patcher):
    """Whether any of FAM's functions is in a patcher's tables."""
    opts = patcher.model_options
    to = opts.get("transformer_options", {})
    fns = list(to.get("patches", {}).get("attn1_patch", ()))
    fns += list(to.get("patches_replace", {}).get("attn1", {}).values())
    fns.append(opts.get("model_function_wrapper"))
    return any(getattr(f, GEN_ATTR, None) is not None for f in fns)


def assert_left_as_found(p, model, state):
    base, before = state
    assert not {"sample", "sample_hr_pass", "_fam_generation"} & set(p.__dict__)
    assert (options(base), base.extra_preserved_memory_during_sampling) == before
    assert not has_fam(model.forge_objects.unet)
    assert all("forward" not in m.__dict__ for m in model.forge_objects.unet.model.modules())


# ---- the Forge flavours against the A1111 miniature ------------------------------------------
@pytest.mark.parametrize("flavor", FLAVORS)
def test_hires_fix_with_fam_on_every_forge_flavour(web, flavor):
    model = forge_model(flavor=flavor)
    state = base_state(model)
    plain_p = txt2img(web, model, [], flavor=flavor)
    plain, _ = run(web, plain_p)
    p = txt2img(web, model, flavor=flavor)
    out, info = run(web, p)
    assert fam_info(info) == FamParams(enabled=True).to_infotext()      # no skips, no notes
    assert (out - plain).abs().max() > 1e-2
    assert p.scripts.hires_hook_calls == (2 if flavor == "main" else 1)
    assert_left_as_found(p, model, state)
    again, _ = run(web, txt2img(web, model, [], flavor=flavor))
    assert torch.equal(again, plain)                                     # plain after FAM


def test_forge_flavours_give_the_a1111_image(web):
    """Forge main's twice-called hook (first on the old UNet), Neo's and ersatzForge's single
    hook around `before_hr`, Neo's shallow clone and its `sampling_sigmas`, and reForge's
    options without cond indices change nothing: each is the A1111 image of the same weights
    and seed."""
    ref, ref_info = run(web, web.txt2img(a1111_model(sd1_like(0)), FAM))
    for flavor in ("main", "neo", "ersatz", "reforge"):
        out, info = run(web, txt2img(web, forge_model(flavor=flavor), flavor=flavor))
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        assert fam_info(info) == fam_info(ref_info)


@pytest.mark.parametrize("batch, parts, max_chunks", [(2, 2, None), (2, 2, 1), (1, 1, 1)],
                         ids=["AND", "AND-chunked", "chunked"])
def test_and_prompts_and_chunked_batches_give_the_a1111_image(web, batch, parts, max_chunks):
    ref, _ = run(web, web.txt2img(a1111_model(sd1_like(0)), FAM, batch_size=batch, parts=parts))
    p = txt2img(web, forge_model(), batch_size=batch, parts=parts, max_chunks=max_chunks)
    out, info = run(web, p)
    assert not {"FAM AM skipped", "FAM note"} & set(info)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_hires_cfg_one_guides_the_cond_rows_alone(web):
    model = forge_model()
    p = txt2img(web, model, hr_cfg=1.0, batch_size=2)
    out, info = run(web, p)
    assert p.sampler.model_wrap_cfg.calls == [[0]] * 4      # the hires pass: no uncond rows
    assert not {"FAM AM skipped", "FAM note"} & set(info)
    plain, _ = run(web, txt2img(web, model, [], hr_cfg=1.0, batch_size=2))
    assert (out - plain).abs().max() > 1e-2


@pytest.mark.parametrize("budget", [8192, 0], ids=["record", "recompute"])
def test_a_first_pass_at_cfg_1_under_a_hires_cfg_guides_every_row(web, budget):
    """First pass at CFG 1 (cond rows only), Hires CFG 5: the uncond rows take their image's
    cond map, and no row is skipped for it."""
    model = forge_model()
    p = txt2img(web, model, [{"enabled": True, "record_budget_mb": budget}], cfg_scale=1.0,
                hr_cfg=5.0, batch_size=2)
    out, info = run(web, p)
    assert sorted(p.sampler.model_wrap_cfg.calls[0]) == [0, 1]   # the hires pass has uncond rows
    assert "FAM AM skipped" not in info and "FAM note" not in info
    assert info["FAM AM fallback"].startswith(f"{4 * 3} of {4 * 3} calls: rows of a CFG branch")
    plain, _ = run(web, txt2img(web, model, [], cfg_scale=1.0, hr_cfg=5.0, batch_size=2))
    assert (out - plain).abs().max() > 1e-2


def test_classic_first_steps_without_uncond_are_guided_throughout(web):
    """Classic runs step 0 of each pass with cond rows only: the record has no uncond maps
    for σ_max, and the hires step at σ_max has no uncond rows either."""
    model = forge_model()
    p = txt2img(web, model, flavor="classic")
    out, info = run(web, p)
    assert p.sampler.model_wrap_cfg.calls[:2] == [[0], [1, 0]]
    assert not {"FAM AM skipped", "FAM note"} & set(info)
    partial = txt2img(web, model, [{"enabled": True, "full_renoise": False}], flavor="classic",
                      denoising_strength=0.5)
    _, info = run(web, partial)
    assert not {"FAM AM skipped", "FAM note"} & set(info)


@pytest.mark.parametrize("flavor, sampler", [(f, s) for f in BACKEND for s in ("DDIM", "UniPC")
                                              if (f, s) != ("neo", "UniPC")])   # refused below
def test_timestep_samplers(web, sampler, flavor):
    model = forge_model(flavor=flavor)
    out, info = run(web, txt2img(web, model, sampler_name=sampler, flavor=flavor))
    plain, _ = run(web, txt2img(web, model, [], sampler_name=sampler, flavor=flavor))
    assert not {"FAM AM skipped", "FAM note"} & set(info)
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-2


@pytest.mark.parametrize("sampler, hr_sampler", [("UniPC", None), ("Euler", "UniPC")])
def test_unipc_on_neo_is_refused_naming_the_sampler(web, sampler, hr_sampler):
    """Neo runs UniPC as a k-diffusion sampler on a copy of its latent: FM could not reach
    it. The high-res pass refuses it before its first step (a 422), and the first pass,
    which only records, runs as chosen."""
    model = forge_model(flavor="neo")
    state = base_state(model)
    p = txt2img(web, model, sampler_name=sampler, hr_sampler_name=hr_sampler, flavor="neo")
    with pytest.raises(FamRequestError, match="^FAM Diffusion cannot guide the sampler UniPC "
                                              "in this WebUI") as e:
        web.process_images(p)
    assert e.value.status_code == 422 and "Euler" in str(e.value)
    assert p.sampler.model_wrap_cfg.calls == []          # no high-res step ran
    assert_left_as_found(p, model, state)
    plain, _ = run(web, txt2img(web, model, [], sampler_name=sampler, hr_sampler_name=hr_sampler,
                                flavor="neo"))
    assert torch.isfinite(plain).all()                    # without FAM Neo's UniPC runs


def test_neo_writes_the_schedule_into_the_patcher_fam_put_in_place(web):
    """Neo's sampler writes `sampling_sigmas` into whichever patcher is active: FAM's clone
    takes it (every attn1 patch sees it among its options), the base patcher stays clean."""
    model = forge_model(flavor="neo")
    base = model.forge_objects_after_applying_lora.unet
    seen = []
    p = txt2img(web, model, flavor="neo")
    real = p.create_sampler

    def create_sampler(name):
        sampler = real(name)
        cfg_forward = sampler.model_wrap_cfg.forward

        def forward(*a, **k):
            seen.append("sampling_sigmas" in p.sd_model.forge_objects.unet.model_options["transformer_options"])
            return cfg_forward(*a, **k)
        sampler.model_wrap_cfg.forward = forward
        return sampler
    p.create_sampler = create_sampler
    _, info = run(web, p)
    assert seen and all(seen) and "FAM note" not in info
    assert "sampling_sigmas" not in base.model_options["transformer_options"]


# ---- img2img and the upscale button -----------------------------------------------------------
@pytest.mark.parametrize("flavor", ["main", "neo", "ersatz", "classic"])
def test_img2img_upscaling_on_the_reference_path(web, flavor):
    unet = forge_like.forge_unet(sd1_without_top_attention())
    patcher = forge_like.NeoUnetPatcher if flavor == "neo" else forge_like.UnetPatcher
    model = forge_like.sd_model(unet, SIGMA_TABLE, patcher=patcher)
    state = base_state(model)
    kw = dict(init_images=[image()], width=520, height=520, flavor=flavor)
    p = forge_like.Img2Img(web, model, [{"enabled": True, "full_renoise": False}], **kw)
    out, info = run(web, p)
    assert info["FAM AM path"] == "recompute" and "FAM AM skipped" not in info
    plain, _ = run(web, forge_like.Img2Img(web, model, [], **kw))
    assert (out - plain).abs().max() > 1e-3
    assert_left_as_found(p, model, state)


def test_upscale_button(web):
    model = forge_model()
    p = txt2img(web, model, firstpass_image=image(1))
    out, info = run(web, p)
    assert info["FAM AM path"] == "recompute" and "FAM AM skipped" not in info
    assert torch.isfinite(out).all()


# ---- everything off, whatever happens -------------------------------------------------------
@pytest.mark.parametrize("flavor", FLAVORS)
def test_an_exception_in_the_hires_pass_leaves_nothing_behind(web, flavor):
    model = forge_model(flavor=flavor)
    state = base_state(model)
    p = txt2img(web, model, flavor=flavor)
    hr_pass = p.sample_hr_pass

    def failing(samples, *a, **k):   # dies inside the hires pass, after FAM's set-up
        p.scripts.process_before_every_sampling(p, x=samples, noise=samples, c=p.c, uc=p.uc)
        raise RuntimeError("out of memory in the hires pass")
    p.sample_hr_pass = failing
    with pytest.raises(RuntimeError, match="out of memory"):
        web.process_images(p)
    p.sample_hr_pass = hr_pass
    del p.sample_hr_pass
    assert_left_as_found(p, model, state)
    plain, _ = run(web, txt2img(web, model, [], flavor=flavor))
    ref, _ = run(web, txt2img(web, forge_model(flavor=flavor), [], flavor=flavor))
    assert torch.equal(plain, ref)


# ---- request errors: 422, nothing half-patched ------------------------------------------------
def flux_model():
    model = forge_like.sd_model(torch.nn.Linear(4, 4), SIGMA_TABLE, kind="Flux",
                                title="flux1-dev.safetensors")
    return model


@pytest.mark.parametrize("make, match", [
    (lambda web, m: txt2img(web, flux_model()), r"Flux\.1 is a transformer model"),
    (lambda web, m: txt2img(web, m, [{"enabled": True, "am_lambda": 3}]), "am_lambda"),
    (lambda web, m: txt2img(web, m, [True, "x"]), "fm_enabled|FM"),
    (lambda web, m: txt2img(web, m, enable_hr=False), "enable Hires. fix"),
    (lambda web, m: txt2img(web, m, hr_model=forge_model(sdxl_like, "tiny-xl.safetensors", is_sdxl=True)),
     "tiny-xl.safetensors has a different architecture"),
    (lambda web, m: forge_like.Img2Img(web, m, FAM, init_images=[image()], width=512, height=512),
     "larger than the model's native size"),
], ids=["flux", "bad-dict", "bad-positional", "no-hires", "other-hires-model", "img2img-small"])
def test_errors_are_422_request_errors_and_leave_nothing_behind(web, make, match):
    model = forge_model()
    state = base_state(model)
    p = make(web, model)
    with pytest.raises(FamRequestError, match=match) as e:
        web.process_images(p)
    assert e.value.status_code == 422 and not web.logged
    assert_left_as_found(p, p.sd_model, base_state(p.sd_model))
    assert_left_as_found(p, model, state)


# ---- the script loads where Forge Classic moved the XYZ helpers -------------------------------
def test_script_loads_without_xyz_boolean_choice():
    class ClassicWebUI(MiniWebUI):
        def _xyz_module(self):
            m = super()._xyz_module()
            del m.boolean_choice          # Classic keeps it in lib_xyz.utils
            return m

    web = ClassicWebUI()
    axes = {o.label: o for o in web.xyz.axis_options}
    switch = axes["[FAM] Frequency Modulation"]
    assert switch.choices() == ["False", "True"] and len(axes) == len(FamParams.names())
    assert isinstance(web.script_module, types.ModuleType)
