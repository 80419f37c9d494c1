"""The Forge host at torch level, on ldm-named tiny UNets driven by stand-ins for Forge's
UnetPatcher, transformer blocks and CFG batch assembly (tests/forge_like.py). The A1111 host
on the same weights is the reference: the same generation through both must agree."""

import copy
import enum
import sys
from types import ModuleType, SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import forge_like
from a1111_like import BETAS, SCHEDULE, TIMESTEPS, conds, ddim, euler, extra_host_reads, sigmas
from fam.hosts.forge import (ForgeGeneration, forge_generation, forge_layout, forge_schedule,
                             low_vram_mode, webui_attention)
from fam.hosts.patcher import chunk_roles, native_kwargs, sdpa_attention
from fam.hosts.sdxl import native_size_vector
from fam.hosts.unet_hooks import GEN_ATTR
from fam.hosts.webui_args import FamRequestError
from fam.params import FamParams
from fam.record import Role
from ldm_like import sd1_like, sdxl_like
from test_a1111 import HIRES, NATIVE, generate

ON = FamParams(enabled=True)
SIGMA_TABLE = ((1 - torch.cumprod(1 - BETAS, 0)) / torch.cumprod(1 - BETAS, 0)).sqrt().float()


PATCHERS = [forge_like.UnetPatcher, forge_like.NeoUnetPatcher]   # deep-copying, Neo's shallow clone


def forge_model(make, seed=0, patcher=forge_like.UnetPatcher):
    return forge_like.sd_model(forge_like.forge_unet(make(seed)), SIGMA_TABLE, patcher=patcher)


def new_generation(model, params=ON, **kw):
    return ForgeGeneration(params, forge_layout(model, "tiny"),
                           forge_schedule(model.forge_objects.unet.model), "tiny", **kw)


def reset(model, patcher):
    """What Forge does before every sampler run: a fresh ForgeObjects with the base UNet."""
    model.forge_objects = SimpleNamespace(unet=patcher)


def snapshot(patcher):
    return copy.deepcopy(patcher.model_options), patcher.extra_preserved_memory_during_sampling


def job(model, batch=1, steps=4):
    """The p and sampler a pass hands the generation (`model_wrap_cfg` is set per pass)."""
    p = SimpleNamespace(sd_model=model, batch_size=batch, height=8 * NATIVE[0],
                        width=8 * NATIVE[1], steps=steps)
    return p, SimpleNamespace(model_wrap_cfg=None, func=None)


def forge_generate(model, params=ON, batch=1, parts=1, max_chunks=None, vp=False,
                   reference=False, native_scale=5.0, hires_scale=5.0, double_hook=False,
                   with_reset=True,
                   inference_mode=False, after_fam=None):
    """Native pass then high-res pass as Forge runs them, with `generate`'s inputs, FAM on
    both when enabled; the UNet reset before each pass; the hires hook run once or twice
    (Forge main: the second time after another reset, on the same sampler)."""
    base = model.forge_objects.unet
    cond, uncond = conds(batch, parts)
    g = torch.Generator().manual_seed(1)
    noise_n = torch.randn(batch, 4, *NATIVE, generator=g)
    noise_h = torch.randn(batch, 4, *HIRES, generator=g)
    gen = new_generation(model, params) if params.enabled else None
    p, sampler = job(model, batch)
    grad = torch.inference_mode() if inference_mode else torch.no_grad()
    try:
        with grad:
            reset(model, base)
            cfg = sampler.model_wrap_cfg = forge_like.CFGDenoiser(model, max_chunks, timesteps=vp)
            if gen and not reference:
                gen.record_native(p, sampler, vp)
            native = (ddim(cfg, noise_n, TIMESTEPS, cond, uncond, scale=native_scale) if vp
                      else euler(cfg, noise_n * 14.6, sigmas(), cond, uncond, scale=native_scale))
            z0 = F.interpolate(native.float(), size=HIRES, mode="bicubic")
            if not (gen and double_hook):   # Forge main's first hires call sees the old UNet
                reset(model, base)
            sampler = SimpleNamespace(func=None)
            cfg = sampler.model_wrap_cfg = forge_like.CFGDenoiser(model, max_chunks, timesteps=vp)
            if gen:
                gen.guide_hires(p, sampler, z0, noise_h, vp, reference=native if reference else None)
                if double_hook:
                    if with_reset:
                        reset(model, base)
                    gen.refresh(p)
                if after_fam:   # another extension's hook, after FAM's, on the same UNet
                    after_fam(model.forge_objects.unet)
            if vp:
                a = torch.cumprod(1 - BETAS, 0).float()[999]
                hires = ddim(cfg, a.sqrt() * z0 + (1 - a).sqrt() * noise_h, TIMESTEPS, cond,
                             uncond, scale=hires_scale)
            else:
                hires = euler(cfg, z0 + noise_h * 14.6, sigmas(), cond, uncond, scale=hires_scale)
            unet_used = model.forge_objects.unet
        return SimpleNamespace(out=hires, gen=gen, cfg=cfg, unet=unet_used,
                               info=gen.report() if gen else {})
    finally:
        if gen:
            gen.remove()


# ---- pieces -----------------------------------------------------------------------------
def test_chunk_roles_map_forge_chunks_to_images_and_branches():
    assert chunk_roles([1, 0], 4) == [Role(0, True), Role(1, True), Role(0), Role(1)]
    assert chunk_roles([0], 2) == [Role(0), Role(1)]
    assert chunk_roles([1, 0, 0], 3, first_part=0) == [Role(0, True), Role(0, False, 0),
                                                        Role(0, False, 1)]
    assert chunk_roles([0], 1, first_part=1) == [Role(0, False, 1)]
    assert chunk_roles([1, 0], 3) == [] and chunk_roles([2], 1) == [] and chunk_roles([], 1) == []


def test_sdpa_attention_matches_the_stand_in_blocks_attention():
    q, k, v = torch.randn(3, 2, 10, 16).unbind(0)
    assert torch.allclose(sdpa_attention(q, k, v, 4), forge_like._attention(q, k, v, 4), atol=1e-6)


def test_native_kwargs_resize_image_conditioning_and_drop_controlnet():
    opts = {"block": ("output", 3)}
    c = {"c_crossattn": torch.zeros(2, 3, 8), "c_concat": torch.randn(2, 5, 16, 16),
         "control": {"output": [torch.zeros(2, 4, 16, 16)]}, "transformer_options": opts}
    out = native_kwargs(c, (8, 8))
    assert out["c_concat"].shape == (2, 5, 8, 8) and "control" not in out
    assert out["transformer_options"] == opts and out["transformer_options"] is not opts
    assert out["c_crossattn"] is c["c_crossattn"]


def test_native_size_vector_rewrites_only_the_size_embeddings():
    def embedder(t):   # Forge's: a sinusoidal embedding of one number, here 4 wide
        return torch.cat([t.sin(), t.cos(), (t / 2).sin(), (t / 2).cos()])[None]

    def vector(h, w, crop=(3.0, 5.0), pooled=torch.arange(6.0)):
        parts = [embedder(torch.tensor([float(v)])) for v in (h, w, *crop, h, w)]
        return torch.cat([pooled, torch.cat(parts).flatten()])[None].repeat(2, 1)

    out = native_size_vector(embedder, vector(1024, 2048), 512, 1024)
    assert torch.equal(out, vector(512, 1024))


@pytest.mark.parametrize("make, expect", [
    (sd1_like, {("output", i, 0) for i in (3, 4, 5)}),
    (sdxl_like, {("output", i, t) for i in (0, 1, 2) for t in range(3)})], ids=["sd1", "sdxl"])
def test_am_layers_get_replacements_under_forges_keys(make, expect):
    model = forge_model(make)
    gen = new_generation(model)
    p, sampler = job(model)
    sampler.model_wrap_cfg = forge_like.CFGDenoiser(model)
    gen.record_native(p, sampler, vp=False)
    native_clone = model.forge_objects.unet
    assert "attn1" not in native_clone.model_options["transformer_options"].get("patches_replace", {})
    hires = SimpleNamespace(model_wrap_cfg=forge_like.CFGDenoiser(model), func=None)
    gen.guide_hires(p, hires, torch.zeros(1, 4, *HIRES), torch.zeros(1, 4, *HIRES), vp=False)
    table = model.forge_objects.unet.model_options["transformer_options"]["patches_replace"]["attn1"]
    assert set(table) == expect
    gen.remove()


def test_non_unet_models_are_refused_by_type():
    """The rule itself is tested in test_model_kinds.py; here: forge_layout applies it."""
    flux = type("Flux", (SimpleNamespace,), {})()
    flux.forge_objects = SimpleNamespace(unet=forge_like.UnetPatcher(
        forge_like.KModel(torch.nn.Linear(4, 4), SIGMA_TABLE)))
    with pytest.raises(FamRequestError, match=r"^FAM Diffusion needs an SD1\.x/SD2\.x/SDXL UNet "
                                              r"model; Flux\.1 is a transformer model$"):
        forge_layout(flux, "flux1.safetensors")
    with pytest.raises(FamRequestError, match="has no denoising network"):
        forge_layout(SimpleNamespace(forge_objects=SimpleNamespace()), "x")


def test_schedule_from_the_models_sigma_table():
    model = forge_model(sd1_like)
    sched = forge_schedule(model.forge_objects.unet.model)
    for t in (0, 250, 999):
        assert sched.t_to_sigma(t) == pytest.approx(SCHEDULE.t_to_sigma(t), rel=1e-5)
    ldm_patched_style = SimpleNamespace(model_sampling=SimpleNamespace(sigmas=SIGMA_TABLE))
    assert forge_schedule(ldm_patched_style).sigma_max == pytest.approx(sched.sigma_max)
    with pytest.raises(FamRequestError, match="no discrete noise schedule"):
        forge_schedule(SimpleNamespace())


def test_forge_generation_from_the_models_module():
    engine = type("StableDiffusion", (), {"__module__": "backend.diffusion_engine.sd15"})()
    engine.forge_objects = None
    ldm = type("LatentDiffusion", (), {"__module__": "ldm.models.diffusion.ddpm"})()
    ldm.forge_objects = None
    a1111 = type("LatentDiffusion", (), {"__module__": "ldm.models.diffusion.ddpm"})()
    assert forge_generation(engine) == "backend" and forge_generation(ldm) == "ldm_patched"
    assert forge_generation(a1111) is None


class VRAMState(enum.Enum):
    NORMAL_VRAM, LOW_VRAM, NO_VRAM = 3, 2, 1


@pytest.mark.parametrize("generation, attention, memory", [
    ("backend", ("backend.attention", "attention_function"), "backend.memory_management"),
    ("ldm_patched", ("ldm_patched.ldm.modules.attention", "optimized_attention"),
     "ldm_patched.modules.model_management")])
def test_webui_attention_and_vram_state_follow_forges_current_setting(
        monkeypatch, generation, attention, memory):
    att, mem = ModuleType(attention[0]), ModuleType(memory)
    monkeypatch.setitem(sys.modules, attention[0], att)
    monkeypatch.setitem(sys.modules, memory, mem)
    setattr(att, attention[1], lambda q, k, v, heads: ("first", heads))
    fn = webui_attention(generation)
    setattr(att, attention[1], lambda q, k, v, heads: ("switched", heads))  # user changed it
    assert fn(None, None, None, 8) == ("switched", 8)
    mem.vram_state = VRAMState.NORMAL_VRAM
    assert not low_vram_mode(generation)
    mem.current_loaded_models = [SimpleNamespace(model_accelerated=False)]
    assert not low_vram_mode(generation)
    mem.current_loaded_models.append(SimpleNamespace(model_accelerated=True))  # swapped in parts
    assert low_vram_mode(generation)
    mem.current_loaded_models.clear()
    mem.vram_state = VRAMState.LOW_VRAM
    assert low_vram_mode(generation)


def test_a_model_loaded_in_parts_on_forge_neo_is_low_vram(monkeypatch):
    """Neo 2026's `LoadedModel` has no `model_accelerated`: a partial load shows as
    `model_lowvram` on the torch model under the patcher, and as offloaded bytes."""
    mem = ModuleType("backend.memory_management")
    monkeypatch.setitem(sys.modules, "backend.memory_management", mem)
    mem.vram_state = VRAMState.NORMAL_VRAM

    def loaded(lowvram, offloaded):
        torch_model = SimpleNamespace(model_lowvram=lowvram)
        return SimpleNamespace(model=SimpleNamespace(model=torch_model),
                               model_offloaded_memory=lambda: offloaded)
    mem.current_loaded_models = [loaded(False, 0)]
    assert not low_vram_mode("backend")
    mem.current_loaded_models.append(loaded(True, 0))
    assert low_vram_mode("backend")
    mem.current_loaded_models[1:] = [loaded(False, 1 << 20)]
    assert low_vram_mode("backend")


# ---- end to end against the A1111 path ------------------------------------------------------
@pytest.mark.parametrize("patcher", PATCHERS, ids=["main", "neo"])
@pytest.mark.parametrize("make", [sd1_like, sdxl_like], ids=["sd1", "sdxl"])
def test_forge_and_a1111_hosts_agree(make, patcher):
    model = forge_model(make, patcher=patcher)
    plain_f = forge_generate(model, FamParams()).out
    plain_a = generate(make(0), FamParams()).out
    torch.testing.assert_close(plain_f, plain_a, atol=1e-4, rtol=1e-4)   # the stand-ins agree
    f = forge_generate(model)
    a = generate(make(0))
    assert not f.gen.run.am_skipped and f.gen.run.am_calls == a.gen.run.am_calls > 0
    assert f.gen.run.fm_calls == a.gen.run.fm_calls == 4 and f.info == a.info == {}
    torch.testing.assert_close(f.out, a.out, atol=1e-4, rtol=1e-4)
    assert (f.out - plain_f).abs().max() > 1e-2


@pytest.mark.parametrize("off", [dict(am_lambda=0.0), dict(am_enabled=False)], ids=["lambda0", "am_off"])
def test_fm_runs_without_am_as_on_a1111(off):
    """Without AM the UNet is left unpatched in both passes; FM still learns the native size
    from the first pass's denoiser and guides every high-res step."""
    model = forge_model(sd1_like)
    f = forge_generate(model, ON.replace(**off))
    a = generate(sd1_like(0), ON.replace(**off))
    assert f.gen.run.fm_calls == a.gen.run.fm_calls == 4 and f.gen.run.am_calls == 0
    torch.testing.assert_close(f.out, a.out, atol=1e-4, rtol=1e-4)
    assert (f.out - forge_generate(model, FamParams()).out).abs().max() > 1e-2


@pytest.mark.parametrize("batch, parts, max_chunks", [
    (1, 1, None), (1, 1, 1), (2, 1, None), (2, 1, 1), (2, 2, None), (2, 2, 1), (1, 3, 2)])
def test_every_row_layout_gives_the_a1111_result(batch, parts, max_chunks):
    model = forge_model(sd1_like)
    f = forge_generate(model, batch=batch, parts=parts, max_chunks=max_chunks)
    a = generate(sd1_like(0), batch=batch, parts=parts)
    chunks = parts + 1
    per_step = [[1] + [0] * parts] if max_chunks is None else None
    if per_step:
        assert f.cfg.calls == per_step * 4
    else:   # [1] then [0] (or [1, 0] then [0]): separate UNet calls in Forge's order
        assert sum(len(c) for c in f.cfg.calls) == chunks * 4 and len(f.cfg.calls) > 4
        assert f.cfg.calls[0][0] == 1
    assert not f.gen.run.am_skipped
    torch.testing.assert_close(f.out, a.out, atol=1e-4, rtol=1e-4)


def test_hires_cfg_one_runs_am_on_cond_rows_only():
    model = forge_model(sd1_like)
    r = forge_generate(model, batch=2, hires_scale=1.0)
    assert r.cfg.calls == [[0]] * 4
    assert not r.gen.run.am_skipped and r.gen.run.am_calls == 4 * len(r.gen.layers)
    plain = forge_generate(model, FamParams(), batch=2, hires_scale=1.0).out
    assert not torch.equal(r.out, plain) and torch.isfinite(r.out).all()


@pytest.mark.parametrize("budget", [8192, 0], ids=["record", "recompute"])
@pytest.mark.parametrize("chunks", [None, 1])
def test_uncond_rows_a_first_pass_at_cfg_1_never_ran_take_the_cond_map(budget, chunks):
    """Forge's Hires CFG above a first pass at CFG 1: the native pass has cond rows only. The
    uncond rows borrow their image's cond map; the cond rows are modulated as always."""
    model = forge_model(sd1_like)
    r = forge_generate(model, ON.replace(record_budget_mb=budget), batch=2, native_scale=1.0,
                       max_chunks=chunks)
    run = r.gen.run
    assert not run.am_skipped and run.am_calls == 4 * len(r.gen.layers) * (2 if chunks else 1)
    assert run.am_borrowed == run.am_calls // (2 if chunks else 1) and not run.am_partial
    assert r.info["FAM AM fallback"].startswith(f"{run.am_borrowed} of {run.am_calls} calls")
    plain = forge_generate(model, FamParams(), batch=2, native_scale=1.0, max_chunks=chunks).out
    assert not torch.equal(r.out, plain) and torch.isfinite(r.out).all()


def test_timestep_samplers_match_the_a1111_vp_path():
    model = forge_model(sd1_like)
    f = forge_generate(model, vp=True)
    a = generate(sd1_like(0), vp=True)
    assert f.gen.run.fm_calls == 5 and not f.gen.run.am_skipped
    assert f.gen.run.am_calls == 5 * len(f.gen.layers)
    torch.testing.assert_close(f.out, a.out, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("max_chunks", [None, 1])
def test_reference_path_for_img2img_and_the_upscale_button(max_chunks):
    model = forge_model(sd1_like)
    f = forge_generate(model, batch=2, max_chunks=max_chunks, reference=True)
    a = generate(sd1_like(0), batch=2, reference=True)
    assert f.info == {"FAM AM path": "recompute"} and not f.gen.run.am_skipped
    torch.testing.assert_close(f.out, a.out, atol=1e-4, rtol=1e-4)


def test_record_and_recompute_paths_agree():
    model = forge_model(sd1_like)
    rec = forge_generate(model, batch=2, parts=2, max_chunks=2)
    rep = forge_generate(model, ON.replace(record_budget_mb=0), batch=2, parts=2, max_chunks=2)
    assert rep.info == {"FAM AM path": "recompute"} and rep.gen.run.replays == 4 * 2
    assert torch.equal(rec.out, rep.out)


@pytest.mark.parametrize("vp", [False, True], ids=["sigma", "timesteps"])
def test_sigma_is_read_once_per_cfg_call_however_the_batch_is_chunked(vp):
    """On a GPU every host read of σ waits for the device: one per CFG call (in the CFG
    denoiser), none per UNet batch; +1 per generation for Forge's σ table."""
    model = forge_model(sd1_like)
    (whole, r), (chunked, c) = (extra_host_reads(forge_generate, model, batch=2, max_chunks=n,
                                                 vp=vp) for n in (None, 1))
    assert r.gen.run.am_calls > 0 and not r.gen.run.am_skipped and not c.gen.run.am_skipped
    assert whole == chunked == r.cfg.step * 2 + 1   # both passes


def test_sigma_matching_keys_the_record_by_the_unets_sigma():
    model = forge_model(sd1_like)
    gen = new_generation(model)
    cond, uncond = conds()
    try:
        with torch.no_grad():
            p, sampler = job(model)
            cfg = sampler.model_wrap_cfg = forge_like.CFGDenoiser(model)
            gen.record_native(p, sampler, vp=False)
            euler(cfg, torch.randn(1, 4, *NATIVE) * 14.6, sigmas(), cond, uncond)
            assert gen.run.record.sigmas == pytest.approx([0.3, 1.2, 4.0, 14.6])
            assert gen.run.record.nearest(1.0).sigma == pytest.approx(1.2)
    finally:
        gen.remove()


def test_works_on_inference_tensors():
    model = forge_model(sd1_like)
    a = forge_generate(model, inference_mode=True, batch=2)
    b = forge_generate(model, batch=2)
    assert a.out.is_inference() and torch.equal(a.out, b.out)


# ---- patch discipline -------------------------------------------------------------------------
@pytest.mark.parametrize("with_reset", [True, False])
def test_double_hires_hook_does_not_stack(with_reset):
    model = forge_model(sd1_like)
    once = forge_generate(model)
    twice = forge_generate(model, double_hook=True, with_reset=with_reset)
    assert torch.equal(once.out, twice.out)
    assert twice.gen.run.fm_calls == 4 and twice.gen.run.am_calls == once.gen.run.am_calls
    to = twice.unet.model_options["transformer_options"]
    assert len(to["patches"]["attn1_patch"]) == 1
    assert twice.unet.model_options["model_function_wrapper"].previous is None


@pytest.mark.parametrize("patcher", PATCHERS, ids=["main", "neo"])
def test_the_callers_patcher_is_never_changed_and_is_back_after(patcher):
    model = forge_model(sd1_like, patcher=patcher)
    base = model.forge_objects.unet
    foreign = lambda n, c, v, extra: (n, c, v)   # noqa: E731 - another extension's patch
    base.set_model_attn1_patch(foreign)
    before = snapshot(base)
    plain = forge_generate(model, FamParams()).out
    r = forge_generate(model)
    assert r.unet is not base and snapshot(base) == before
    assert r.unet.model_options["transformer_options"]["patches"]["attn1_patch"][0] is foreign
    assert model.forge_objects.unet is base
    assert torch.equal(forge_generate(model, FamParams()).out, plain)   # plain after FAM


def test_an_earlier_unet_wrapper_stays_in_the_chain():
    model = forge_model(sd1_like)
    seen = []

    def wrapper(apply_model, args):
        seen.append(args["cond_or_uncond"])
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.forge_objects.unet.set_model_unet_function_wrapper(wrapper)
    plain = forge_generate(model, FamParams())
    n_plain = len(seen)
    r = forge_generate(model)
    assert len(seen) == 2 * n_plain and not r.gen.run.am_skipped and r.gen.run.am_calls > 0
    assert r.unet.model_options["model_function_wrapper"].previous is wrapper
    assert not torch.equal(r.out, plain.out)


def test_an_attn1_patch_after_fams_that_merges_tokens_is_noted():
    def merge(n, context, value, extra):
        return n, context[:, ::2], value[:, ::2]    # fewer keys, as token-merging tricks do

    model = forge_model(sd1_like)
    r = forge_generate(model, after_fam=lambda unet: unet.set_model_attn1_patch(merge))
    assert r.info["FAM note"].startswith(f"AM fell back to plain attention in {4 * 3} calls")


def test_an_attn1_replacement_set_after_fams_is_noted():
    """StyleAlign / Reference put their own attention on every attn1 key after FAM's."""
    def replace_all(unet):
        def theirs(q, k, v, extra):
            return sdpa_attention(q, k, v, extra["n_heads"])
        unet.set_model_attn1_replace(theirs, "output", 3, 0)

    model = forge_model(sd1_like)
    r = forge_generate(model, after_fam=replace_all)
    assert r.info["FAM note"] == (f"AM did not run in 4 of {4 * 3} calls: another extension "
                                  "replaced the attention of the AM layers after FAM")


def test_an_attn1_replacement_set_before_fams_is_kept_and_noted():
    """Another extension's attention on an AM layer, there before FAM: it keeps running and
    the infotext says AM did not run there, as for one set after FAM."""
    calls = []

    def theirs(q, k, v, extra):
        calls.append(q.shape[1])
        return sdpa_attention(q, k, v, extra["n_heads"])

    model = forge_model(sd1_like)
    model.forge_objects.unet.set_model_attn1_replace(theirs, "output", 3, 0)
    r = forge_generate(model)
    assert r.info["FAM note"] == (f"AM did not run in 4 of {4 * 3} calls: another extension "
                                  "replaced the attention of the AM layers before FAM")
    hires_tokens = (HIRES[0] // 4) * (HIRES[1] // 4)
    assert calls.count(hires_tokens) == 4 and len(calls) == 8     # native and hires pass
    assert r.gen.run.am_calls == 4 * 2 and not r.gen.run.am_skipped


def test_a_unet_wrapper_replaced_after_fams_is_noted():
    def wrapper(apply_model, args):
        return apply_model(args["input"], args["timestep"], **args["c"])

    model = forge_model(sd1_like)
    r = forge_generate(model, after_fam=lambda unet: unet.set_model_unet_function_wrapper(wrapper))
    assert r.info["FAM note"] == "AM did not run: another extension replaced Forge's UNet function wrapper"
    assert r.gen.run.fm_calls == 4 and r.gen.run.am_calls == 0


def test_leftover_clone_functions_are_inert_after_remove():
    model = forge_model(sd1_like)
    r = forge_generate(model)
    model.forge_objects.unet = r.unet      # something kept FAM's clone past the generation
    inert = forge_generate(model, FamParams()).out
    model.forge_objects.unet = r.unet.clone()
    model.forge_objects.unet.model_options = {"transformer_options": {}}
    assert torch.equal(inert, forge_generate(model, FamParams()).out)
    assert getattr(r.unet.model_options["model_function_wrapper"], GEN_ATTR) is r.gen.hooks


def test_failed_setup_makes_the_sampler_raise_and_comes_off():
    model = forge_model(sd1_like)
    gen = new_generation(model)
    cfg = forge_like.CFGDenoiser(model)
    gen.fail(SimpleNamespace(model_wrap_cfg=cfg), FamRequestError("FAM: broken"))
    cond, uncond = conds()
    with pytest.raises(FamRequestError, match="broken"):
        euler(cfg, torch.randn(1, 4, *NATIVE), sigmas(), cond, uncond)
    gen.remove()
    assert "forward" not in cfg.__dict__


def test_hires_without_native_pass_is_refused():
    model = forge_model(sd1_like)
    gen = new_generation(model)
    p, sampler = job(model)
    sampler.model_wrap_cfg = forge_like.CFGDenoiser(model)
    with pytest.raises(FamRequestError, match="no native pass"):
        gen.guide_hires(p, sampler, torch.zeros(1, 4, *HIRES), torch.zeros(1, 4, *HIRES), vp=False)


def test_hires_model_of_another_architecture_is_refused_by_name():
    gen = new_generation(forge_model(sd1_like))
    with pytest.raises(FamRequestError, match="xl.safetensors.*different architecture"):
        gen.move_to(forge_layout(forge_model(sdxl_like)), "xl.safetensors")


# ---- memory ---------------------------------------------------------------------------------
def test_memory_reserved_for_the_record_on_a_gpu_only():
    model = forge_model(sd1_like)
    model.forge_objects.unet.load_device = torch.device("cuda")   # never used to compute here
    base = model.forge_objects.unet

    def pass_of(gen):
        p, sampler = job(model, batch=2)
        sampler.model_wrap_cfg = forge_like.CFGDenoiser(model)
        return p, sampler

    def native_reserve(params, **kw):
        gen = new_generation(model, params, **kw)
        gen.record_native(*pass_of(gen), vp=False)
        reserved = model.forge_objects.unet.extra_preserved_memory_during_sampling
        gen.remove()
        return gen, reserved

    step = sum(2 * 2 * (NATIVE[0] // 4) * (NATIVE[1] // 4) * 32 * 4 for _ in range(3))
    assert native_reserve(ON)[1] == 0                                     # record in RAM
    assert native_reserve(ON.replace(record_offload=False))[1] == 2 * 4 * step
    assert native_reserve(ON.replace(record_offload=False, record_budget_mb=0))[1] == 0
    gen = new_generation(model, ON.replace(record_offload=False))
    gen.record_native(*pass_of(gen), vp=False)
    gen.guide_hires(*pass_of(gen), torch.zeros(2, 4, *HIRES), torch.zeros(2, 4, *HIRES), vp=False)
    assert model.forge_objects.unet.extra_preserved_memory_during_sampling == step  # one step
    gen.refresh(pass_of(gen)[0])                 # the hook again, no reset: counted once
    assert model.forge_objects.unet.extra_preserved_memory_during_sampling == step
    gen.remove()
    gen, reserved = native_reserve(ON.replace(record_offload=False), low_vram=True)
    assert reserved == 0 and gen.params.record_offload
    assert gen.report()["FAM record"] == "kept in RAM (low VRAM)"
    assert base.extra_preserved_memory_during_sampling == 0
    base.load_device = torch.device("cpu")
    assert native_reserve(ON.replace(record_offload=False))[1] == 0
