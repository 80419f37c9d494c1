"""End to end on tiny SD1.5-like and SDXL-like UNets: native pass → FAM high-res pass."""

import pytest
import torch

import diffusers
from conftest import SCHED_KW, cfg_cond
from fam.frequency import highpass_box
from fam.hosts.diffusers import generate, upsample_latent
from fam.params import FamParams

ON = FamParams(enabled=True)
SCALES = {"2x": (2, 2), "3x": (3, 3), "2x4": (2, 4)}
NATIVE = (16, 16)


def run(unet, arch, scale=(2, 2), params=ON, sched=None, steps=4, seed=0, batch=1, **kw):
    sched = sched or diffusers.EulerDiscreteScheduler(**SCHED_KW)
    hires = (int(NATIVE[0] * scale[0]), int(NATIVE[1] * scale[1]))
    return generate(unet, sched, cfg_cond(arch, batch), native_hw=NATIVE, hires_hw=hires,
                    steps=steps, params=params, seed=seed, **kw)


def processors(unet):
    return {k: id(v) for k, v in unet.attn_processors.items()}


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("scale", list(SCALES), ids=list(SCALES))
def test_fam_end_to_end(unets, arch, scale):
    unet = unets[arch]
    before = processors(unet)
    a = run(unet, arch, SCALES[scale])
    b = run(unet, arch, SCALES[scale])
    assert processors(unet) == before
    assert a.hires.shape[-2:] == (NATIVE[0] * SCALES[scale][0], NATIVE[1] * SCALES[scale][1])
    assert torch.isfinite(a.hires).all()
    assert torch.equal(a.hires, b.hires) and torch.equal(a.native, b.native)
    assert a.run.am_calls > 0 and not a.run.am_skipped and a.info == {}
    assert a.run.fm_calls == 4


def test_processors_restored_when_the_pass_raises(unets, monkeypatch):
    unet = unets["sd15"]
    before = processors(unet)
    sched = diffusers.EulerDiscreteScheduler(**SCHED_KW)
    calls = {"n": 0}
    real_step = type(sched).step

    def failing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:       # inside the high-res pass
            raise RuntimeError("boom")
        return real_step(self, *a, **k)

    monkeypatch.setattr(type(sched), "step", failing_step)
    with pytest.raises(RuntimeError, match="boom"):
        run(unet, "sd15", sched=sched)
    assert processors(unet) == before


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_attention_modulation_changes_the_result(unets, arch):
    with_am = run(unets[arch], arch, params=ON).hires
    lam0 = run(unets[arch], arch, params=ON.replace(am_lambda=0.0)).hires
    no_am = run(unets[arch], arch, params=ON.replace(am_enabled=False)).hires
    assert torch.equal(lam0, no_am)
    rel = (with_am - lam0).norm() / lam0.norm()
    assert rel > 1e-3, f"AM changed the latent by only {rel:.2e}"


def low_band_distance(z, ref):
    """Distance inside the largest FM box (ρ → 0, c = 0.5)."""
    inside = torch.fft.ifftshift(highpass_box(z.shape[-2:], NATIVE, 0.0, 0.5)) < 1
    return (torch.fft.fft2(z.double()) - torch.fft.fft2(ref.double()))[..., inside].abs().mean()


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_frequency_modulation_pulls_the_low_band_to_the_native_image(unets, arch):
    fm = run(unets[arch], arch, params=ON)
    no_fm = run(unets[arch], arch, params=ON.replace(fm_enabled=False))
    z0 = upsample_latent(fm.native, fm.hires.shape[-2:])
    d_fm, d_plain = low_band_distance(fm.hires, z0), low_band_distance(no_fm.hires, z0)
    assert d_fm < 0.5 * d_plain, (d_fm, d_plain)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_record_and_recompute_paths_agree(unets, arch):
    rec = run(unets[arch], arch, scale=(2, 3), batch=2)
    rep = run(unets[arch], arch, scale=(2, 3), batch=2, params=ON.replace(record_budget_mb=0))
    assert rec.run.replays == 0 and rep.run.replays == 4
    assert rep.info == {"FAM AM path": "recompute"}
    torch.testing.assert_close(rec.hires, rep.hires, atol=1e-5, rtol=0)


SCHEDULERS = ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
              "DPMSolverMultistepScheduler", "DDIMScheduler", "HeunDiscreteScheduler",
              "UniPCMultistepScheduler"]


@pytest.mark.parametrize("name", SCHEDULERS)
def test_schedulers(unets, name):
    sched = getattr(diffusers, name)(**SCHED_KW)
    a = run(unets["sd15"], "sd15", sched=sched)
    b = run(unets["sd15"], "sd15", sched=sched)
    assert torch.isfinite(a.hires).all() and torch.equal(a.hires, b.hires)
    assert a.run.am_calls > 0 and not a.run.am_skipped and a.run.fm_calls > 0


def test_partial_strength_and_non_integer_scale(unets):
    r = run(unets["sd15"], "sd15", scale=(1.5, 1.5),
            params=ON.replace(full_renoise=False), denoising_strength=0.5)
    assert r.hires.shape[-2:] == (24, 24) and torch.isfinite(r.hires).all()
    assert r.run.fm_calls == 2 and r.run.am_calls == 3 * 2 and not r.run.am_skipped


def test_plain_hires_when_disabled(unets):
    before = processors(unets["sd15"])
    r = run(unets["sd15"], "sd15", params=FamParams(enabled=False))
    assert r.run is None and processors(unets["sd15"]) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_offloaded_record_equals_device_record():
    from conftest import tiny_sdxl
    unet = tiny_sdxl().cuda()
    sched = diffusers.EulerDiscreteScheduler(**SCHED_KW)
    cond = cfg_cond("sdxl")
    cond.states = cond.states.cuda()
    cond.added = {k: v.cuda() for k, v in cond.added.items()}
    out = {}
    for offload in (False, True):
        r = generate(unet, sched, cond, native_hw=NATIVE, hires_hw=(32, 32), steps=4,
                     params=ON.replace(record_offload=offload))
        assert r.run.am_calls > 0 and not r.run.am_skipped
        out[offload] = r.hires
    torch.testing.assert_close(out[True], out[False], atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
@pytest.mark.parametrize("budget", [8192, 0], ids=["record", "recompute"])
def test_guidance_one_evaluates_only_the_cond_rows(unets, arch, budget):
    unet = unets[arch]
    rows = []
    hook = unet.conv_in.register_forward_hook(lambda m, a, o: rows.append(a[0].shape[0]))
    try:
        params = FamParams(enabled=True, record_budget_mb=budget)
        one = run(unet, arch, params=params, batch=2, guidance_scale=1.0)
    finally:
        hook.remove()
    assert set(rows) == {2} and one.run.am_calls > 0 and not one.run.am_skipped
    both = run(unet, arch, params=params, batch=2, guidance_scale=1.0 + 1e-6)   # two branches
    torch.testing.assert_close(one.native, both.native, atol=1e-4, rtol=0)
    torch.testing.assert_close(one.hires, both.hires, atol=1e-4, rtol=0)
