"""The A1111 adapter at torch level, on ldm-named tiny UNets driven by a stand-in for the
WebUI's CFG denoiser (`a1111_like.CFG`)."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fam.hosts.a1111 import (A1111Generation, Attn1Hook, RowCursor, a1111_roles, cond_repeats,
                             native_cond)
from fam.hosts.sdxl import with_native_size
from fam.hosts.webui import reference_size
from fam.hosts.webui_args import FamRequestError
from fam.frequency import frequency_modulate
from fam.layers import discover
from fam.params import FamParams
from fam.record import Role
from fam.schedule import noised_reference
import a1111_like
from a1111_like import (BETAS, CFG, SCHEDULE, TIMESTEPS, conds, ddim, euler, extra_host_reads,
                        sd_model, sigmas)
from ldm_like import sd1_like, sdxl_like

ON = FamParams(enabled=True)
NATIVE, HIRES = (8, 8), (16, 16)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))]


def sampler_of(cfg):
    return SimpleNamespace(model_wrap_cfg=cfg, func=None)


def generate(unet, params=ON, batch=1, parts=1, split=None, skip_uncond=False, vp=False,
             reference=False, device="cpu", hires_unet=None, hires_vp=None, native_kw=None,
             hires_kw=None, between=None, conditioner=None):
    """Native pass then high-res pass as the WebUI runs them, FAM on both when enabled
    (fp16 on CUDA, as the WebUI runs there). `hires_unet`/`hires_vp`: another checkpoint or
    sampler kind for the hires pass; `*_kw`: CFG stand-in options per pass; `between()`
    runs between the passes (what the WebUI does to the first-pass model)."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    hires_unet = unet if hires_unet is None else hires_unet
    hires_vp = vp if hires_vp is None else hires_vp
    for u in (unet, hires_unet):
        u.to(device, dtype)
    cond, uncond = conds(batch, parts)
    cond.batch = [[t.to(device, dtype) for t in parts_] for parts_ in cond.batch]
    uncond = uncond.to(device, dtype)
    g = torch.Generator().manual_seed(1)
    noise_n = torch.randn(batch, 4, *NATIVE, generator=g).to(device, dtype)
    noise_h = torch.randn(batch, 4, *HIRES, generator=g).to(device, dtype)
    gen, p = None, SimpleNamespace(sd_model=sd_model(unet))
    if params.enabled:
        gen = A1111Generation(params, discover(unet), SCHEDULE, "tiny")
        gen.install()
    try:
        with torch.no_grad():
            cfg = CFG(unet, vp, split, **{"skip_uncond": skip_uncond, **(native_kw or {})})
            if gen and not reference:
                gen.record_native(p, sampler_of(cfg), vp)
            if vp:
                native = ddim(cfg, noise_n, TIMESTEPS, cond, uncond)
            else:
                native = euler(cfg, noise_n * 14.6, sigmas(), cond, uncond)
            if between:
                between()
            p.sd_model = sd_model(hires_unet, conditioner=conditioner)
            z0 = F.interpolate(native.float(), size=HIRES, mode="bicubic").to(dtype)
            cfg = CFG(hires_unet, hires_vp, split, **{"skip_uncond": skip_uncond, **(hires_kw or {})})
            if gen:
                gen.guide_hires(p, sampler_of(cfg), z0, noise_h, hires_vp,
                                reference=native if reference else None)
            if hires_vp:
                a = torch.cumprod(1 - BETAS, 0).float()[999]
                hires = ddim(cfg, a.sqrt() * z0 + (1 - a).sqrt() * noise_h, TIMESTEPS, cond, uncond)
            else:
                hires = euler(cfg, z0 + noise_h * 14.6, sigmas(), cond, uncond)
        return SimpleNamespace(out=hires, gen=gen, cfg=cfg, info=gen.report() if gen else {},
                               run=gen.run if gen else None)
    finally:
        if gen:
            gen.remove()


def forwards(unet):
    return {n: m.__dict__.get("forward") for n, m in unet.named_modules()}


# ---- row roles ------------------------------------------------------------------------
def test_a1111_roles_follow_the_webui_layout():
    assert a1111_roles([2, 1]) == [Role(0, False, 0), Role(0, False, 1), Role(1, False, 0),
                                 Role(0, True), Role(1, True)]


def test_cond_repeats_counts_and_parts_per_image():
    assert cond_repeats(SimpleNamespace(batch=[[1, 2], [3]]), 2) == [2, 1]
    assert cond_repeats(torch.zeros(3, 4), 3) == [1, 1, 1]


def test_row_cursor_hands_split_calls_their_roles():
    c = RowCursor()
    c.reset(a1111_roles([2, 1]))
    assert c.take(2) == [Role(0, False, 0), Role(0, False, 1)]
    assert c.take(1) == [Role(1, False, 0)]
    assert c.take(2) == [Role(0, True), Role(1, True)]
    assert c.take(1) == []                         # an extra block: no role


# ---- the attn1 hook -------------------------------------------------------------------
def test_hook_dispatches_other_calls_to_the_class_forward_and_restores():
    unet = sd1_like()
    layer = discover(unet).am_layers()[0]
    x = torch.randn(2, 16, layer.module.to_q.in_features)
    context = torch.randn(2, 3, x.shape[-1])
    ref, ref_ctx = layer.module(x), layer.module(x, context=context)
    hooks = SimpleNamespace(in_unet_call=False, run=None)
    hook = Attn1Hook(hooks, layer)
    hook.install()
    assert layer.module.forward is hook
    assert torch.equal(layer.module(x), ref)
    hooks.in_unet_call = True       # inside a FAM UNet call, cross-attention still passes
    assert torch.equal(layer.module(x, context=context), ref_ctx)
    hook.remove()
    assert "forward" not in layer.module.__dict__


def test_only_plain_self_attention_reaches_the_run():
    unet = sd1_like()
    layer = discover(unet).am_layers()[0]
    asked, passed = [], []
    layer.module.forward = lambda x, **kw: passed.append(sorted(kw)) or x   # sgm-like forward
    run = SimpleNamespace(on_attn1=lambda name, hidden: asked.append(name))
    hook = Attn1Hook(SimpleNamespace(in_unet_call=True, run=run), layer)
    hook.install()
    x = torch.randn(2, 16, layer.module.to_q.in_features)
    try:
        layer.module(x, context=torch.randn(2, 3, x.shape[-1]))
        layer.module(x, mask=torch.ones(2, 16, dtype=torch.bool))
        layer.module(x, additional_tokens=torch.ones(2, 1, x.shape[-1]))
        assert asked == [] and len(passed) == 3
        layer.module(x, additional_tokens=None, n_times_crossframe_attn_in_self=0)
        assert asked == [layer.name] and len(passed) == 4   # asked, declined, passed on
    finally:
        hook.remove()


def test_hook_keeps_an_earlier_instance_wrapper_and_survives_one_put_on_top():
    unet = sd1_like()
    layer = discover(unet).am_layers()[0]
    module, calls = layer.module, []

    def earlier(x, context=None, mask=None, **kw):  # e.g. Hypertile's, installed once for good
        calls.append("earlier")
        return type(module).forward(module, x, context=context, mask=mask)

    module.forward = earlier
    hook = Attn1Hook(SimpleNamespace(in_unet_call=False, run=None), layer)
    hook.install()
    x = torch.randn(1, 16, module.to_q.in_features)
    module(x)
    assert calls == ["earlier"]
    hook.remove()
    assert module.forward is earlier

    hook = Attn1Hook(SimpleNamespace(in_unet_call=False, run=None), layer)
    hook.install()
    on_top = hook.__call__
    module.forward = lambda x, **kw: on_top(x, **kw)  # someone wrapped us afterwards
    hook.remove()                                     # we stay as a pass-through
    assert torch.equal(module(x), type(module).forward(module, x))


def test_double_install_is_refused():
    unet = sd1_like()
    gen = A1111Generation(ON, discover(unet), SCHEDULE)
    gen.install()
    try:
        with pytest.raises(RuntimeError, match="already installed"):
            A1111Generation(ON, discover(unet), SCHEDULE).install()
    finally:
        gen.remove()
    assert all(v is None for v in forwards(unet).values())


# ---- end to end on the stand-in -------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("make", [sd1_like, sdxl_like], ids=["sd1", "sdxl"])
def test_fam_records_then_guides_and_removes_everything(make, device):
    unet = make()
    before = forwards(unet)
    plain = generate(unet, FamParams(), device=device).out
    a, b = generate(unet, device=device), generate(unet, device=device)
    assert forwards(unet) == before and "forward" not in a.cfg.__dict__
    assert "forward" not in a.cfg.inner_model.__dict__
    assert torch.equal(a.out, b.out) and torch.isfinite(a.out).all()
    assert not torch.equal(a.out, plain)
    assert a.gen.run.fm_calls == 4 and a.gen.run.am_calls == 4 * len(a.gen.layers)
    assert a.info == {}


def test_fam_with_both_effects_off_is_bit_identical_to_plain():
    unet = sd1_like()
    plain = generate(unet, FamParams()).out
    off = generate(unet, ON.replace(fm_enabled=False, am_enabled=False)).out
    assert torch.equal(plain, off)


def test_attention_and_frequency_modulation_each_change_the_result():
    unet = sd1_like()
    full = generate(unet).out
    no_am = generate(unet, ON.replace(am_enabled=False)).out
    no_fm = generate(unet, ON.replace(fm_enabled=False)).out
    assert not torch.equal(full, no_am) and not torch.equal(full, no_fm)


@pytest.mark.parametrize("split", [1, 2, 3])
def test_split_unet_calls_match_one_batched_call(split):
    unet = sd1_like()
    whole = generate(unet, batch=2, parts=2)
    parts = generate(unet, batch=2, parts=2, split=split)
    assert parts.cfg.rows_seen == [6] * 4 and not parts.gen.run.am_skipped
    assert parts.gen.run.am_calls == whole.gen.run.am_calls * -(-6 // split)
    torch.testing.assert_close(parts.out, whole.out, atol=1e-3, rtol=1e-3)


def test_uncond_skipped_calls_are_guided_too():
    unet = sd1_like()
    r = generate(unet, batch=2, skip_uncond=True)
    assert r.cfg.rows_seen == [2] * 4 and not r.gen.run.am_skipped and r.gen.run.am_calls > 0


@pytest.mark.parametrize("device", DEVICES)
def test_record_and_recompute_paths_agree(device):
    unet = sd1_like()
    rec = generate(unet, batch=2, parts=2, split=2, device=device)
    rep = generate(unet, ON.replace(record_budget_mb=0), batch=2, parts=2, split=2,
                   device=device)
    assert rep.info == {"FAM AM path": "recompute"} and rep.gen.run.replays == 4 * 3
    assert torch.equal(rec.out, rep.out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", [None, 2])
def test_reference_path_for_img2img_and_the_upscale_button(split, device):
    unet = sd1_like()
    r = generate(unet, batch=2, split=split, reference=True, device=device)
    assert torch.isfinite(r.out).all() and not r.gen.run.am_skipped
    assert r.gen.run.am_calls == 4 * len(r.gen.layers) * (1 if split is None else 2)
    assert r.info == {"FAM AM path": "recompute"}
    plain = generate(unet, FamParams(), batch=2, split=split, device=device).out
    assert not torch.equal(r.out, plain)


@pytest.mark.parametrize("device", DEVICES)
def test_timestep_samplers_in_vp_form(device):
    unet = sd1_like()
    r = generate(unet, vp=True, device=device)
    assert torch.isfinite(r.out).all() and r.gen.run.fm_calls == 5 and not r.gen.run.am_skipped
    assert r.gen.run.am_calls == 5 * len(r.gen.layers)
    # the pass ran a timestep sampler: its CFG calls pass t
    assert r.gen.sigma_of(torch.tensor([501.0])) == pytest.approx(SCHEDULE.t_to_sigma(501))


@pytest.mark.parametrize("vp", [False, True], ids=["sigma", "timesteps"])
def test_sigma_is_read_once_per_cfg_call_however_the_batch_is_split(vp):
    """On a GPU every host read of σ waits for the device: one per CFG call (in the CFG
    denoiser), none per inner UNet call."""
    unet = sd1_like()
    (whole, r), (split, s) = (extra_host_reads(generate, unet, batch=2, split=n, vp=vp)
                              for n in (None, 1))
    assert r.run.am_calls > 0 and not r.run.am_skipped and not s.run.am_skipped
    assert whole == split == len(r.cfg.rows_seen) * 2   # both passes


def test_sigma_matching_uses_the_nearest_native_step():
    unet = sd1_like()
    gen = A1111Generation(ON, discover(unet), SCHEDULE)
    cond, uncond = conds()
    gen.install()
    try:
        with torch.no_grad():
            cfg = CFG(unet)
            gen.record_native(SimpleNamespace(), sampler_of(cfg), vp=False)
            euler(cfg, torch.randn(1, 4, *NATIVE) * 14.6, sigmas(), cond, uncond)
            assert gen.run.record.sigmas == pytest.approx([0.3, 1.2, 4.0, 14.6])
            assert gen.run.record.nearest(1.0).sigma == pytest.approx(1.2)
            assert gen.run.record.nearest(2.5).sigma == pytest.approx(4.0)
    finally:
        gen.remove()


def test_failed_setup_makes_the_sampler_raise_and_comes_off():
    unet = sd1_like()
    gen = A1111Generation(ON, discover(unet), SCHEDULE)
    cfg = CFG(unet)
    error = FamRequestError("FAM: broken")
    gen.fail(sampler_of(cfg), error)
    cond, uncond = conds()
    with pytest.raises(FamRequestError, match="broken"):
        euler(cfg, torch.randn(1, 4, *NATIVE), sigmas(), cond, uncond)
    gen.remove()
    assert "forward" not in cfg.__dict__ and gen.error is error


def test_hooks_come_off_when_the_pass_raises():
    unet = sd1_like()
    before = forwards(unet)
    gen = A1111Generation(ON, discover(unet), SCHEDULE)
    gen.install()
    cfg = CFG(unet)
    gen.record_native(SimpleNamespace(), sampler_of(cfg), vp=False)
    cond, uncond = conds()
    with pytest.raises(TypeError):
        try:
            cfg(torch.randn(1, 4, *NATIVE), torch.ones(1), uncond=uncond, cond=cond,
                cond_scale=None)
        finally:
            gen.remove()
    assert forwards(unet) == before and "forward" not in cfg.__dict__


def test_hires_model_of_another_architecture_is_refused_by_name():
    gen = A1111Generation(ON, discover(sd1_like()), SCHEDULE)
    with pytest.raises(FamRequestError, match="xl.safetensors.*different architecture"):
        gen.move_to(discover(sdxl_like()), "xl.safetensors")


def test_hires_model_of_the_same_architecture_takes_the_hooks():
    a, b = sd1_like(0), sd1_like(1)
    gen = A1111Generation(ON, discover(a), SCHEDULE)
    gen.install()
    gen.move_to(discover(b), "b")
    assert all(isinstance(l.module.__dict__.get("forward"), Attn1Hook) for l in gen.layers)
    assert all(v is None for v in forwards(a).values())
    gen.remove()
    assert all(v is None for v in forwards(b).values())


def test_native_cond_resizes_only_spatial_image_conditioning():
    dummy = torch.zeros(2, 5, 1, 1)
    inpaint = torch.randn(2, 5, 16, 16)
    out = native_cond({"cond": {"c_crossattn": [1], "c_concat": [dummy]}}, (8, 8))
    assert out["cond"]["c_concat"][0] is dummy
    out = native_cond({"cond": {"c_crossattn": [1], "c_concat": [inpaint]}}, (8, 8))
    assert out["cond"]["c_concat"][0].shape == (2, 5, 8, 8)


@pytest.mark.parametrize("size, native, expect", [
    ((1024, 1024), 512, (512, 512)), ((2048, 1024), 1024, (1448, 728)), ((640, 640), 512, (512, 512))])
def test_reference_size_keeps_aspect_at_native_area(size, native, expect):
    w, h = reference_size(*size, native)
    assert (w, h) == expect and w % 8 == 0 and h % 8 == 0
    assert math.isclose(w * h, native * native, rel_tol=0.02)


def test_a_unet_that_never_calls_its_attn1_layers_is_noted():
    hooked, other = sd1_like(0), sd1_like(1)      # e.g. a TensorRT engine runs instead
    gen = A1111Generation(ON, discover(hooked), SCHEDULE)
    gen.install()
    cond, uncond = conds()
    try:
        with torch.no_grad():
            p = SimpleNamespace(sd_model=sd_model(hooked))
            cfg = CFG(other)
            gen.record_native(p, sampler_of(cfg), vp=False)
            native = euler(cfg, torch.randn(1, 4, *NATIVE) * 14.6, sigmas(), cond, uncond)
            cfg = CFG(other)
            z0, eps = F.interpolate(native, size=HIRES), torch.randn(1, 4, *HIRES)
            gen.guide_hires(p, sampler_of(cfg), z0, eps, vp=False)
            euler(cfg, z0 + 14.6 * eps, sigmas(), cond, uncond)
        assert gen.report()["FAM note"].startswith("AM did not run")
    finally:
        gen.remove()


# ---- λ = 0 and AM off cost nothing ------------------------------------------------------------
@pytest.mark.parametrize("path", ["record", "recompute", "reference"])
@pytest.mark.parametrize("off", [dict(am_lambda=0.0), dict(am_enabled=False)], ids=["lambda0", "am_off"])
def test_am_that_cannot_change_anything_costs_nothing(path, off):
    unet = sd1_like()
    params = ON.replace(record_budget_mb=0 if path == "recompute" else 8192, **off)
    before = forwards(unet)
    r = generate(unet, params, batch=2, reference=path == "reference",
                 between=lambda: (forwards(unet) == before) or pytest.fail("attn1 hooked"))
    assert r.run.replays == 0 and r.run.am_calls == 0 and not r.run.am_skipped
    assert r.info == {} and r.run.fm_calls == 4
    fm_only = generate(unet, ON.replace(am_enabled=False), batch=2, reference=path == "reference")
    assert torch.equal(r.out, fm_only.out)


# ---- a hires checkpoint on the recompute path ----------------------------------------------
def test_recompute_path_replays_through_the_hires_checkpoint():
    first = sd1_like()
    hires = copy.deepcopy(first)     # another checkpoint object (same weights: same maps)

    def unload_first():              # A1111 moves the first-pass model away
        first.forward = lambda *a, **k: pytest.fail("the first-pass UNet ran in the hires pass")

    rec = generate(first, batch=2, hires_unet=hires)
    rep = generate(first, ON.replace(record_budget_mb=0), batch=2, hires_unet=hires,
                   between=unload_first)
    assert rep.run.replays == 4 and rep.run.am_calls == rec.run.am_calls > 0
    assert not rep.run.am_skipped and rep.info == {"FAM AM path": "recompute"}
    assert torch.equal(rec.out, rep.out)


@pytest.mark.parametrize("vp, hires_vp", [(False, True), (True, False)])
def test_recompute_path_across_sampler_kinds(vp, hires_vp):
    """Euler first pass, DDIM hires pass and back: replays convert σ/t and the latent space."""
    unet = sd1_like()
    rec = generate(unet, vp=vp, hires_vp=hires_vp)
    rep = generate(unet, ON.replace(record_budget_mb=0), vp=vp, hires_vp=hires_vp)
    assert rep.run.replays > 0 and not rep.run.am_skipped and rep.run.am_calls == rec.run.am_calls
    torch.testing.assert_close(rep.out, rec.out, atol=1e-4, rtol=1e-4)


# ---- SDXL size conditioning of native replays ----------------------------------------------
class SizeEmbedder(nn.Module):
    """sgm's ConcatTimestepEmbedderND in spirit: each value of the row sinusoidally embedded
    in `outdim` dims, concatenated."""

    def __init__(self, key, outdim=8):
        super().__init__()
        self.input_key, self.outdim = key, outdim

    def forward(self, x):
        freqs = torch.exp(-math.log(10000) * torch.arange(self.outdim // 2) / (self.outdim // 2))
        args = x.float().reshape(-1)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
        return emb.reshape(x.shape[0], -1)


class TextEmbedder(nn.Module):
    input_key = "txt"

    def forward(self, txt):
        g = torch.Generator().manual_seed(len(txt))
        return torch.randn(len(txt), 3, 8, generator=g), torch.randn(len(txt), 6, generator=g)


class Conditioner(nn.Module):
    """sgm's GeneralConditioner: 2-D outputs concatenated into `vector` in embedder order."""

    def __init__(self):
        super().__init__()
        self.embedders = nn.ModuleList([TextEmbedder(), SizeEmbedder("original_size_as_tuple"),
                                        SizeEmbedder("crop_coords_top_left"),
                                        SizeEmbedder("target_size_as_tuple")])

    def forward(self, batch):
        vectors = []
        for e in self.embedders:
            out = e(batch[e.input_key])
            vectors += [o for o in (out if isinstance(out, tuple) else (out,)) if o.ndim == 2]
        return torch.cat(vectors, 1)

    def vector(self, height, width, rows=1):
        return self({"txt": ["a"] * rows, "original_size_as_tuple": torch.tensor([[height, width]] * rows),
                     "crop_coords_top_left": torch.tensor([[0, 0]] * rows),
                     "target_size_as_tuple": torch.tensor([[height, width]] * rows)})


def test_native_size_vector_is_what_a_native_pass_gets():
    c = Conditioner()
    hires, native = c.vector(2048, 1536, rows=2), c.vector(1024, 768, rows=2)
    assert not torch.equal(hires, native)
    torch.testing.assert_close(with_native_size(c, hires, 1024, 768), native, atol=0, rtol=0)
    out = native_cond({"cond": {"crossattn": torch.zeros(2, 3, 8), "vector": hires}}, (128, 96), c)
    torch.testing.assert_close(out["cond"]["vector"], native, atol=0, rtol=0)


def test_reference_path_conditions_native_calls_on_the_native_size():
    c = Conditioner()
    hires_vector = c.vector(HIRES[0] * 8, HIRES[1] * 8)
    r = generate(sdxl_like(), reference=True, conditioner=c,
                 hires_kw=dict(vector=hires_vector, log=[]))
    calls = [(hw, cond["vector"]) for hw, cond in r.cfg.model_wrap.log]
    native = [v for hw, v in calls if hw == NATIVE]
    assert len(native) == 4 and r.run.am_calls > 0
    assert all(torch.equal(v, c.vector(NATIVE[0] * 8, NATIVE[1] * 8).expand_as(v)) for v in native)
    assert all(torch.equal(v, hires_vector.expand_as(v)) for hw, v in calls if hw == HIRES)


# ---- row roles the first pass never ran ---------------------------------------------------
@pytest.mark.parametrize("budget", [8192, 0], ids=["record", "recompute"])
@pytest.mark.parametrize("skipped", [True, {2, 3}], ids=["every step", "late steps (NGMS)"])
def test_uncond_rows_the_first_pass_skipped_take_the_cond_map(skipped, budget):
    """A1111 drops the uncond rows of some first-pass steps (NGMS, skip early CFG): hires
    calls at those σ still modulate every row; the uncond rows borrow their image's cond map."""
    unet = sd1_like()
    r = generate(unet, ON.replace(record_budget_mb=budget), batch=2,
                 native_kw=dict(skip_uncond=skipped))
    steps = 4 if skipped is True else len(skipped)
    assert not r.run.am_skipped and r.run.am_calls == 4 * len(r.gen.layers)
    assert r.run.am_borrowed == steps * len(r.gen.layers) and not r.run.am_partial
    assert r.info["FAM AM fallback"] == (
        f"{r.run.am_borrowed} of {r.run.am_calls} calls: rows of a CFG branch the first pass "
        "did not run took their image's other branch's map")


# ---- hooks of other extensions on native replays (ControlNet) ------------------------------
@pytest.mark.parametrize("path", ["recompute", "reference"])
def test_a_unet_hook_holding_high_res_inputs_skips_am_instead_of_failing(path):
    """A stand-in for ControlNet: its UNet hook adds a hint made for the high-res latent."""
    unet = sd1_like()
    native_sizes = []

    def hint_hook():
        def forward(x, *args, **kwargs):
            if tuple(x.shape[-2:]) != HIRES:
                native_sizes.append(tuple(x.shape[-2:]))
                x + torch.zeros(1, 1, *HIRES)          # the shape error ControlNet would raise
            return type(unet).forward(unet, x, *args, **kwargs)
        unet.forward = forward

    try:
        r = generate(unet, ON.replace(record_budget_mb=0), reference=path == "reference",
                     between=hint_hook)
    finally:
        unet.__dict__.pop("forward", None)
    assert native_sizes == [NATIVE]                 # one try, then no more replays
    assert torch.isfinite(r.out).all() and r.run.am_calls == 0 and r.run.fm_calls == 4
    text = r.info["FAM AM skipped"]
    assert text.startswith("12 of 12 calls") and "native-size UNet call failed (RuntimeError" in text


def test_out_of_memory_in_a_replay_is_not_swallowed():
    unet = sd1_like()

    def oom():
        def forward(x, *args, **kwargs):
            if tuple(x.shape[-2:]) != HIRES:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return type(unet).forward(unet, x, *args, **kwargs)
        unet.forward = forward

    try:
        with pytest.raises(torch.cuda.OutOfMemoryError):
            generate(unet, reference=True, between=oom)
    finally:
        unet.__dict__.pop("forward", None)


# ---- the refiner (AM where the refiner runs) ---------------------------------------
@pytest.mark.parametrize("budget", [8192, 0], ids=["record", "recompute"])
def test_refiner_in_the_first_pass_leaves_am_on_where_the_base_ran(budget):
    unet = sd1_like()
    r = generate(unet, ON.replace(record_budget_mb=budget),
                 native_kw=dict(refiner_at=2, refiner=sdxl_like()))
    per_call = len(r.gen.layers)
    assert r.run.am_calls == 2 * per_call           # the hires steps at σ 14.6 and 4.0
    assert r.info["FAM AM skipped"].startswith(f"{2 * per_call} of {4 * per_call} calls")
    assert "no native record for this step" in r.info["FAM AM skipped"]
    assert r.info["FAM note"] == ("the refiner ran the first pass from σ 1.2 on: hires steps "
                                  "matched to those steps ran without AM")


def test_refiner_in_the_hires_pass_turns_am_off_from_the_switch():
    unet = sd1_like()
    r = generate(unet, hires_kw=dict(refiner_at=2, refiner=sdxl_like()))
    assert r.run.am_calls == 2 * len(r.gen.layers) and not r.run.am_skipped
    assert r.info == {"FAM note": "AM off from the refiner switch at σ 1.2 on "
                                 "(2 of 4 hires denoiser calls)"} and r.run.fm_calls == 4


def test_refiner_in_both_passes_is_noted_for_both():
    unet = sd1_like()
    r = generate(unet, native_kw=dict(refiner_at=3, refiner=sdxl_like()),
                 hires_kw=dict(refiner_at=1, refiner=sdxl_like()))
    assert r.info["FAM note"] == (
        "the refiner ran the first pass from σ 0.3 on: hires steps matched to those steps "
        "ran without AM; AM off from the refiner switch at σ 4 on (3 of 4 hires denoiser calls)")
    assert r.run.am_calls == len(r.gen.layers)


# ---- UniPC's corrector (FM reaches the sampler's state) --------------------------------
@pytest.mark.parametrize("kind", ["unipc", "ddim"])
def test_fm_reaches_the_latent_the_sampler_continues_from(kind):
    """FM only, on A1111's sampler shapes, against the method written into the loop by hand:
    the latent each step starts from is the FM latent."""
    unet = sd1_like()
    cond, uncond = conds()
    g = torch.Generator().manual_seed(3)
    z0, eps = torch.randn(1, 4, *HIRES, generator=g), torch.randn(1, 4, *HIRES, generator=g)
    a = torch.cumprod(1 - BETAS, 0).float()[999]
    start = a.sqrt() * z0 + (1 - a).sqrt() * eps
    loop = {"unipc": a1111_like.unipc, "ddim": ddim}[kind]
    params = ON.replace(am_enabled=False)

    def by_hand(z, t):
        s = SCHEDULE.t_to_sigma(t)
        ref = noised_reference(z0, eps, s, vp=True)
        z.copy_(frequency_modulate(z, ref, SCHEDULE.rho(s), NATIVE, params.fm_cutoff))

    with torch.no_grad():
        want = (a1111_like.unipc(CFG(unet, vp=True), start.clone(), TIMESTEPS, cond, uncond, fm=by_hand)
                if kind == "unipc" else None)
        gen = A1111Generation(params, discover(unet), SCHEDULE)
        cfg = CFG(unet, vp=True)
        progress = lambda d: None  # noqa: E731
        sampler = SimpleNamespace(model_wrap_cfg=cfg, func=loop, callback_state=progress)
        try:
            gen.guide_hires(SimpleNamespace(sd_model=sd_model(unet)), sampler, z0, eps, True,
                            native_hw=NATIVE)
            wrapped = sampler.callback_state is not progress
            got = loop(cfg, start.clone(), TIMESTEPS, cond, uncond, callback=sampler.callback_state)
        finally:
            gen.remove()
    assert wrapped == (kind == "unipc") and sampler.callback_state is progress
    if kind == "unipc":
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert gen.run.fm_calls == 4 + 3              # model inputs, then corrected latents
    else:
        assert gen.run.fm_calls == 5
