"""The A1111 adapter at torch level, on ldm-named tiny UNets driven by a stand-in for the
WebUI's CFG denoiser (A1111's batch layout: per image its cond rows, then the uncond rows;
optionally split into several UNet calls or without the uncond rows)."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fam.hosts.a1111 import (Attn1Hook, FamGeneration, RowCursor, cfg_roles, cond_repeats,
                             native_cond, reference_size)
from fam.hosts.a1111_args import FamRequestError
from fam.layers import discover
from fam.params import FamParams
from fam.record import Role
from fam.schedule import VPSchedule
from ldm_like import sd1_like, sdxl_like

ON = FamParams(enabled=True)
BETAS = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
SCHEDULE = VPSchedule(torch.cumprod(1 - BETAS, 0))
NATIVE, HIRES = (8, 8), (16, 16)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))]


# ---- a stand-in for A1111's denoisers ---------------------------------------------------
class Denoiser(nn.Module):
    """k-diffusion form (CompVisDenoiser): σ in, x0 out; or timestep form (vp): t in, ε out."""

    def __init__(self, unet, vp=False):
        super().__init__()
        self.unet, self.vp = unet, vp

    def forward(self, x, sigma, cond):
        context = cond["c_crossattn"][0]
        if self.vp:
            return self.unet(x, context)
        c_in = (sigma ** 2 + 1) ** -0.5
        return x - sigma[:, None, None, None] * self.unet(x * c_in[:, None, None, None], context)


class CFG(nn.Module):
    """Builds A1111's CFG batch and calls the inner model whole, in chunks of `split` rows,
    or without the uncond rows."""

    def __init__(self, unet, vp=False, split=None, skip_uncond=False):
        super().__init__()
        self.model_wrap = Denoiser(unet, vp)
        self.split, self.skip_uncond = split, skip_uncond
        self.rows_seen = []

    @property
    def inner_model(self):
        return self.model_wrap

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond=0.0, image_cond=None):
        parts = cond.batch
        B = len(parts)
        x_in = torch.cat([x[i:i + 1].expand(len(p), -1, -1, -1) for i, p in enumerate(parts)] + [x])
        s_in = torch.cat([sigma[i:i + 1].expand(len(p)) for i, p in enumerate(parts)] + [sigma])
        c_in = torch.cat([torch.stack(p) for p in parts] + [uncond])
        n = x_in.shape[0] - (B if self.skip_uncond else 0)
        step = self.split or n
        out = torch.cat([self.inner_model(x_in[a:a + step][: n - a], s_in[a:a + step][: n - a],
                                          cond={"c_crossattn": [c_in[a:a + step][: n - a]]})
                         for a in range(0, n, step)])
        self.rows_seen.append(out.shape[0])
        uncond_out = out[-B:] if not self.skip_uncond else out[:B]
        den, at = [], 0
        for i, p in enumerate(parts):
            cond_out = out[at:at + len(p)].mean(0)
            den.append(uncond_out[i] + cond_scale * (cond_out - uncond_out[i]))
            at += len(p)
        return torch.stack(den)


def conds(batch=1, parts=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    multicond = SimpleNamespace(batch=[[torch.randn(3, 8, generator=g) for _ in range(parts)]
                                       for _ in range(batch)])
    return multicond, torch.randn(batch, 3, 8, generator=g)


def sigmas(steps=4):
    return torch.tensor([14.6, 4.0, 1.2, 0.3, 0.0][: steps] + [0.0], dtype=torch.float32)


def euler(cfg, x, sig, cond, uncond, scale=5.0):
    for i in range(len(sig) - 1):
        s = sig[i] * x.new_ones(x.shape[0])
        den = cfg(x, s, uncond=uncond, cond=cond, cond_scale=scale)
        x = x + (x - den) / sig[i] * (sig[i + 1] - sig[i])
    return x


def ddim(cfg, x, ts, cond, uncond, scale=5.0):
    ac = torch.cumprod(1 - BETAS, 0).float()
    for i in reversed(range(len(ts))):
        t = ts[i]
        e = cfg(x, torch.full((x.shape[0],), float(t)), uncond=uncond, cond=cond, cond_scale=scale)
        a, a_prev = ac[t], (ac[ts[i - 1]] if i else torch.tensor(1.0))
        x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
    return x


def generate(unet, params=ON, batch=1, parts=1, split=None, skip_uncond=False, vp=False,
             reference=False, device="cpu"):
    """Native pass then high-res pass as the WebUI runs them, FAM on both when enabled
    (fp16 on CUDA, as the WebUI runs there)."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    unet.to(device, dtype)
    cond, uncond = conds(batch, parts)
    cond.batch = [[t.to(device, dtype) for t in parts_] for parts_ in cond.batch]
    uncond = uncond.to(device, dtype)
    g = torch.Generator().manual_seed(1)
    noise_n = torch.randn(batch, 4, *NATIVE, generator=g).to(device, dtype)
    noise_h = torch.randn(batch, 4, *HIRES, generator=g).to(device, dtype)
    gen = None
    if params.enabled:
        gen = FamGeneration(params, discover(unet), SCHEDULE, "tiny")
        gen.install()
    try:
        with torch.no_grad():
            cfg = CFG(unet, vp, split, skip_uncond)
            if gen and not reference:
                gen.record_native(cfg, vp)
            if vp:
                ts = [1, 251, 501, 751, 999]
                native = ddim(cfg, noise_n, ts, cond, uncond)
            else:
                native = euler(cfg, noise_n * 14.6, sigmas(), cond, uncond)
            z0 = F.interpolate(native.float(), size=HIRES, mode="bicubic").to(dtype)
            cfg = CFG(unet, vp, split, skip_uncond)
            if gen:
                gen.guide_hires(cfg, z0, noise_h, vp, reference=native if reference else None)
            if vp:
                a = torch.cumprod(1 - BETAS, 0).float()[999]
                hires = ddim(cfg, a.sqrt() * z0 + (1 - a).sqrt() * noise_h, ts, cond, uncond)
            else:
                hires = euler(cfg, z0 + noise_h * 14.6, sigmas(), cond, uncond)
        return SimpleNamespace(out=hires, gen=gen, cfg=cfg, info=gen.report() if gen else {})
    finally:
        if gen:
            gen.remove()


def forwards(unet):
    return {n: m.__dict__.get("forward") for n, m in unet.named_modules()}


# ---- row roles ------------------------------------------------------------------------
def test_cfg_roles_follow_the_webui_layout():
    assert cfg_roles([2, 1]) == [Role(0, False, 0), Role(0, False, 1), Role(1, False, 0),
                                 Role(0, True), Role(1, True)]


def test_cond_repeats_counts_and_parts_per_image():
    assert cond_repeats(SimpleNamespace(batch=[[1, 2], [3]]), 2) == [2, 1]
    assert cond_repeats(torch.zeros(3, 4), 3) == [1, 1, 1]


def test_row_cursor_hands_split_calls_their_roles():
    c = RowCursor()
    c.reset(cfg_roles([2, 1]))
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
    gen = SimpleNamespace(in_unet_call=False, run=None)
    hook = Attn1Hook(gen, layer)
    hook.install()
    assert layer.module.forward is hook
    assert torch.equal(layer.module(x), ref)
    gen.in_unet_call = True       # inside a FAM UNet call, cross-attention still passes
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
    gen = FamGeneration(ON, discover(unet), SCHEDULE)
    gen.install()
    try:
        with pytest.raises(RuntimeError, match="already installed"):
            FamGeneration(ON, discover(unet), SCHEDULE).install()
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
    assert r.gen.sigma_of(torch.tensor([501.0]), vp=True) == pytest.approx(SCHEDULE.t_to_sigma(501))


def test_sigma_matching_uses_the_nearest_native_step():
    unet = sd1_like()
    gen = FamGeneration(ON, discover(unet), SCHEDULE)
    cond, uncond = conds()
    gen.install()
    try:
        with torch.no_grad():
            cfg = CFG(unet)
            gen.record_native(cfg, vp=False)
            euler(cfg, torch.randn(1, 4, *NATIVE) * 14.6, sigmas(), cond, uncond)
            assert gen.run.record.sigmas == pytest.approx([0.3, 1.2, 4.0, 14.6])
            assert gen.run.record.nearest(1.0).sigma == pytest.approx(1.2)
            assert gen.run.record.nearest(2.5).sigma == pytest.approx(4.0)
    finally:
        gen.remove()


def test_failed_setup_makes_the_sampler_raise_and_comes_off():
    unet = sd1_like()
    gen = FamGeneration(ON, discover(unet), SCHEDULE)
    cfg = CFG(unet)
    error = FamRequestError("FAM: broken")
    gen.fail(cfg, error)
    cond, uncond = conds()
    with pytest.raises(FamRequestError, match="broken"):
        euler(cfg, torch.randn(1, 4, *NATIVE), sigmas(), cond, uncond)
    gen.remove()
    assert "forward" not in cfg.__dict__ and gen.error is error


def test_hooks_come_off_when_the_pass_raises():
    unet = sd1_like()
    before = forwards(unet)
    gen = FamGeneration(ON, discover(unet), SCHEDULE)
    gen.install()
    cfg = CFG(unet)
    gen.record_native(cfg, vp=False)
    cond, uncond = conds()
    with pytest.raises(TypeError):
        try:
            cfg(torch.randn(1, 4, *NATIVE), torch.ones(1), uncond=uncond, cond=cond,
                cond_scale=None)
        finally:
            gen.remove()
    assert forwards(unet) == before and "forward" not in cfg.__dict__


def test_hires_model_of_another_architecture_is_refused_by_name():
    gen = FamGeneration(ON, discover(sd1_like()), SCHEDULE)
    with pytest.raises(FamRequestError, match="xl.safetensors.*different architecture"):
        gen.move_to(discover(sdxl_like()), "xl.safetensors")


def test_hires_model_of_the_same_architecture_takes_the_hooks():
    a, b = sd1_like(0), sd1_like(1)
    gen = FamGeneration(ON, discover(a), SCHEDULE)
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
    gen = FamGeneration(ON, discover(hooked), SCHEDULE)
    gen.install()
    cond, uncond = conds()
    try:
        with torch.no_grad():
            cfg = CFG(other)
            gen.record_native(cfg, vp=False)
            native = euler(cfg, torch.randn(1, 4, *NATIVE) * 14.6, sigmas(), cond, uncond)
            cfg = CFG(other)
            z0, eps = F.interpolate(native, size=HIRES), torch.randn(1, 4, *HIRES)
            gen.guide_hires(cfg, z0, eps, vp=False)
            euler(cfg, z0 + 14.6 * eps, sigmas(), cond, uncond)
        assert gen.report()["FAM note"].startswith("AM did not run")
    finally:
        gen.remove()
