"""Zero-terminal-SNR (ZTSNR) schedules and v-prediction at the extremes of σ, against float64.

A ZTSNR schedule ends at ᾱ_T = 0, σ = ∞. The WebUIs pin ᾱ_T to 4.8973451890853435e-08
(σ_max ≈ 4518.76), diffusers' σ-space and multistep schedulers to 2⁻²⁴ (σ_max = 4096), and
diffusers' DDIM keeps ᾱ_T = 0. σ_max² ≈ 2·10⁷ does not fit in fp16 and σ·ε is ~10⁴: every
quantity the core derives from σ must stay finite and as exact as the latent's dtype allows."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import diffusers
from conftest import SCHED_KW, cfg_cond, tiny_sdxl
from fam.frequency import frequency_modulate, highpass_box
from fam.guidance import FamRun
from fam.hosts.diffusers import generate, upsample_latent
from fam.layers import discover
from fam.params import FamParams
from fam.record import NativeRecord, Role
from fam.schedule import VPSchedule, noised_reference
from test_frequency import reference as fm_reference

WEBUI_ALPHA_BAR_T = 4.8973451890853435e-08      # what A1111, every Forge and ComfyUI pin ᾱ_T to
DIFFUSERS_ALPHA_BAR_T = 2.0 ** -24               # diffusers' Euler, Euler a, DPM++, UniPC
V_ZTSNR = dict(SCHED_KW, rescale_betas_zero_snr=True, prediction_type="v_prediction",
               timestep_spacing="trailing")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ON = FamParams(enabled=True)


def webui_ztsnr(dtype=torch.float32) -> torch.Tensor:
    """SD's ᾱ table rescaled for zero terminal SNR the way the WebUIs do it, in `dtype`: √ᾱ
    shifted so that its last value is 0 and scaled so that its first is unchanged, then ᾱ_T
    pinned to a tiny positive value."""
    sqrt_ab = diffusers.DDPMScheduler(**SCHED_KW).alphas_cumprod.to(dtype).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    ab = ((sqrt_ab - last) * (first / (first - last))) ** 2
    ab[-1] = WEBUI_ALPHA_BAR_T
    return ab


TABLES = {
    "sd": lambda: diffusers.DDPMScheduler(**SCHED_KW).alphas_cumprod,
    "webui-ztsnr": webui_ztsnr,
    "diffusers-ztsnr": lambda: diffusers.EulerDiscreteScheduler(**V_ZTSNR).alphas_cumprod,
    "ddim-ztsnr": lambda: diffusers.DDIMScheduler(**V_ZTSNR).alphas_cumprod,   # ᾱ_T = 0
}


def sigma_of(alpha_bar: float) -> float:
    return math.sqrt((1 - alpha_bar) / alpha_bar) if alpha_bar > 0 else math.inf


INFINITY_AS = sigma_of(DIFFUSERS_ALPHA_BAR_T)    # where a table's σ = ∞ is placed: 4096


def table_sigmas(ac: torch.Tensor) -> np.ndarray:
    return np.array([sigma_of(a) for a in ac.double().tolist()])


def knots(ac: torch.Tensor) -> np.ndarray:
    """log σ of the table, a σ = ∞ placed at the smallest clamp of it in use (2⁻²⁴: σ 4096)."""
    s = table_sigmas(ac)
    return np.log(np.where(np.isinf(s), INFINITY_AS, s))


def t_reference(ac: torch.Tensor, sigma: float) -> float:
    """Continuous t of σ in float64: linear in log σ between the `knots` (numpy)."""
    if math.isinf(sigma):
        return len(ac) - 1.0
    return float(np.interp(math.log(sigma), knots(ac), np.arange(len(ac), dtype=np.float64)))


def noised64(z0, eps, sigma: float, vp: bool) -> torch.Tensor:
    """z̃₀ + σ·ε, or √ᾱ·z̃₀ + √(1 − ᾱ)·ε with ᾱ = 1/(1 + σ²), in float64 (σ = ∞: ε)."""
    z0, eps = z0.double(), eps.double()
    if not vp:
        return z0 + sigma * eps
    if math.isinf(sigma):
        return eps.clone()
    return (z0 + sigma * eps) / math.sqrt(1 + sigma * sigma)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at each magnitude of x (float64)."""
    fi = torch.finfo(dtype)
    mag = x.double().abs().clamp_min(fi.tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * fi.eps


# the re-noised reference: one rounding to fp16 / bf16 of a float32 value; in float32 itself
# the two products and the sum round
REF_ULPS = {torch.float32: 2, torch.float16: 0.5 + 2 ** -10, torch.bfloat16: 0.5 + 2 ** -10}
# FM is computed in float32 whatever the latent's dtype: one rounding to fp16 / bf16, or the
# float32 FFT's own error (a few spacings of float32)
FM_ULPS = {torch.float32: 16, torch.float16: 1, torch.bfloat16: 1}


def max_ulps(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """max |out − ref| in units of `dtype`'s spacing at the largest |ref| (the latent's scale)."""
    return float((out.double() - ref).abs().max() / ulp(ref.abs().max(), dtype))


# ---- σ ↔ t and ρ ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TABLES))
def test_top_of_the_schedule_is_t_max_and_finite_where_the_table_is(name):
    ac = TABLES[name]()
    s = VPSchedule(ac)
    expected_max = {"sd": 14.614647, "webui-ztsnr": 4518.7637, "diffusers-ztsnr": 4096.0,
                    "ddim-ztsnr": math.inf}[name]
    assert s.sigma_max == pytest.approx(expected_max, rel=1e-6)
    assert s.t_to_sigma(999) == pytest.approx(expected_max, rel=1e-6)
    for sigma in (s.sigma_max, float(torch.tensor(s.sigma_max, dtype=torch.float32)), math.inf):
        assert s.sigma_to_t(sigma) == pytest.approx(999, abs=1e-4)
        assert s.rho(sigma) == pytest.approx(0.999, abs=1e-8)
    for t in (998, 998.25, 998.999, 0, 0.5):       # next to the top, and the bottom: no NaN
        assert s.t_to_sigma(t) == pytest.approx(math.exp(np.interp(t, np.arange(1000), knots(ac))),
                                                rel=1e-12)


@pytest.mark.parametrize("clamp", [INFINITY_AS, sigma_of(WEBUI_ALPHA_BAR_T), 1e30, math.inf])
def test_a_clamped_infinity_is_t_max_on_a_table_that_ends_at_infinity(clamp):
    s = VPSchedule(TABLES["ddim-ztsnr"]())
    assert math.isinf(s.sigma_max)
    assert s.sigma_to_t(clamp) == 999 and s.rho(clamp) == pytest.approx(0.999)


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(list(TABLES)), t=st.floats(0, 999))
def test_sigma_t_round_trip_against_float64(name, t):
    ac = TABLES[name]()
    s = VPSchedule(ac)
    sigma = s.t_to_sigma(t)
    assert not math.isnan(sigma) and sigma > 0
    if math.isinf(sigma):
        assert t == 999 and name == "ddim-ztsnr"
    assert s.sigma_to_t(sigma) == pytest.approx(t, abs=1e-6)
    assert s.sigma_to_t(sigma) == pytest.approx(t_reference(ac, sigma), abs=1e-6)
    assert 0 <= s.rho(sigma) <= 0.999


# ---- the re-noised reference -----------------------------------------------------------------
def _latents(dtype, seed, shape=(2, 4, 24, 20)):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(shape, generator=g, dtype=torch.float64) * 1.5
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    return z0.to(dtype), eps.to(dtype)


def check_noised(z0, eps, sigma, vp):
    dtype = z0.dtype
    out = noised_reference(z0, eps, sigma, vp=vp)
    assert out.dtype == dtype and out.shape == z0.shape
    assert torch.isfinite(out).all()
    ref = noised64(z0, eps, sigma, vp)
    # one rounding to `dtype` of a value computed in float32 (or better), whose own error is a
    # few float32 spacings of its terms
    tol = ulp(ref, dtype) / 2 + 8 * 2.0 ** -24 * (z0.double().abs() + eps.double().abs()
                                                   * (min(sigma, 1.0) if vp else sigma))
    assert bool(((out.double() - ref).abs() <= tol).all()), (sigma, vp, dtype)
    return out, ref


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vp", [False, True], ids=["sigma-space", "vp"])
@pytest.mark.parametrize("sigma", [4518.763671875, 4096.0, 2254.19482421875, 14.6146,
                                   0.0291675, 1e-3])
def test_noised_reference_at_the_extremes_is_one_rounding_from_float64(dtype, vp, sigma):
    z0, eps = _latents(dtype, 0)
    check_noised(z0, eps, sigma, vp)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vp_noised_reference_at_infinity_is_the_noise(dtype):
    z0, eps = _latents(dtype, 1)
    out = noised_reference(z0, eps, math.inf, vp=True)
    assert torch.equal(out, eps)
    with pytest.raises(ValueError, match="σ"):
        noised_reference(z0, eps, math.inf)           # no σ-space latent at σ = ∞


@settings(max_examples=60, deadline=None)
@given(log_sigma=st.floats(math.log(0.0291675), math.log(4518.7637)),
       dtype=st.sampled_from(DTYPES), vp=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_noised_reference_over_the_whole_ztsnr_range(log_sigma, dtype, vp, seed):
    z0, eps = _latents(dtype, seed, shape=(1, 4, 8, 8))
    check_noised(z0, eps, math.exp(log_sigma), vp)


# ---- FM at the extremes ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sigma,vp", [(4518.763671875, False), (4518.763671875, True),
                                      (math.inf, True), (0.0291675, False), (0.0291675, True)])
def test_guide_latent_at_the_extremes_against_float64(dtype, sigma, vp):
    """FamRun.guide_latent (the reference, ρ, FM) at σ_max, σ = ∞ and σ_min of the WebUIs'
    ZTSNR table: finite, and one rounding of the latent's dtype from float64."""
    ac = TABLES["ddim-ztsnr" if math.isinf(sigma) else "webui-ztsnr"]()
    run = FamRun(ON, [], VPSchedule(ac))
    native_hw, hires_hw = (12, 10), (24, 20)
    run.begin_native()
    run.begin_call(sigma, [Role(0)], native_hw)
    z0, eps = _latents(dtype, 2, shape=(2, 4, *hires_hw))
    run.begin_hires(z0, eps, vp=vp)
    x = noised64(*_latents(dtype, 3, shape=(2, 4, *hires_hw)), sigma, vp).to(dtype)
    x_in = x.clone()
    run.guide_latent(x, sigma)
    assert x.dtype == dtype and torch.isfinite(x).all() and run.fm_calls == 1
    rho = t_reference(ac, sigma) / 1000
    z_ref, _ = check_noised(z0, eps, sigma, vp)
    ref = fm_reference(x_in.double(), z_ref.double(), rho, native_hw, 0.5)
    assert max_ulps(x, ref, dtype) <= FM_ULPS[dtype], max_ulps(x, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fm_of_a_sigma_max_latent_does_not_overflow(dtype):
    """A σ-space latent at σ_max 4518.76 is ~10⁴ per element: FM's float32 FFT of it and its
    return to fp16 / bf16 stay finite and within one spacing of the result."""
    x, ref = _latents(dtype, 4, shape=(1, 4, 64, 48))
    x, ref = (t.float() * 4518.76 for t in (x, ref))
    x, ref = x.to(dtype), ref.to(dtype)
    out = frequency_modulate(x, ref, 0.2, (32, 24))
    assert torch.isfinite(out).all()
    expected = fm_reference(x.double(), ref.double(), 0.2, (32, 24), 0.5)
    assert max_ulps(out, expected, dtype) <= FM_ULPS[dtype]


# ---- AM's nearest native step --------------------------------------------------------------
def record_of(sigmas) -> NativeRecord:
    rec = NativeRecord(budget_bytes=0)
    for s in sigmas:
        rec.entry(s).replays.append(s)
    return rec


def key64(sigma: float) -> float:
    """log σ, ∞ placed at σ 4096 as in `knots`."""
    return math.log(INFINITY_AS if math.isinf(sigma) else sigma)


def log_nearest64(native, sigma) -> float:
    """The native σ nearest to σ in log σ (float64 argmin); σ itself when it was recorded."""
    if sigma in native:
        return sigma
    return min(native, key=lambda s: abs(key64(s) - key64(sigma)))


def trailing_sigmas(ac, steps) -> list[float]:
    s = table_sigmas(ac)
    return [float(s[999 - i * (1000 // steps)]) for i in range(steps)]


@pytest.mark.parametrize("native_table,hires_first", [
    ("webui-ztsnr", 4518.763671875),      # same table: the first steps coincide
    ("webui-ztsnr", 4096.0),              # another clamp of ∞ at the top
    ("webui-ztsnr", math.inf),
    ("ddim-ztsnr", math.inf),             # a native table that ends at ∞
    ("ddim-ztsnr", 4096.0),
    ("ddim-ztsnr", 4518.763671875),
    ("diffusers-ztsnr", math.inf),
    ("webui-ztsnr", 14.6146),             # a later start (denoising strength below 1)
    ("webui-ztsnr", 3.0),
])
def test_nearest_native_step_at_the_top_of_a_ztsnr_schedule(native_table, hires_first):
    native = trailing_sigmas(TABLES[native_table](), 20)
    rec = record_of(native)
    got = rec.nearest(hires_first).sigma
    assert got == log_nearest64(native, hires_first)
    if hires_first > 1000:
        assert got == native[0]            # every clamp of ∞ is the native first step


@settings(max_examples=80, deadline=None)
@given(native_table=st.sampled_from(["webui-ztsnr", "ddim-ztsnr", "diffusers-ztsnr"]),
       steps=st.integers(2, 40), log_sigma=st.floats(math.log(0.02), math.log(5000)))
def test_nearest_native_step_is_the_float64_log_sigma_argmin(native_table, steps, log_sigma):
    native = trailing_sigmas(TABLES[native_table](), steps)
    sigma = math.exp(log_sigma)
    got = record_of(native).nearest(sigma).sigma
    best = min(abs(key64(s) - log_sigma) for s in native)
    assert abs(key64(got) - log_sigma) <= best + 1e-12


def test_record_keys_sigma_infinity_and_prefetch_order():
    """σ = ∞ as an entry key: found by equality, sorted above every finite σ, and the entry
    a sampler reaches next is below it."""
    rec = record_of([math.inf, 5.0, 0.5])
    assert rec.sigmas == [0.5, 5.0, math.inf]
    top = rec.nearest(math.inf)
    assert math.isinf(top.sigma) and rec.below(top).sigma == 5.0
    assert rec.nearest(1e6).sigma == math.inf and rec.nearest(6.0).sigma == 5.0


# ---- the diffusers engine with a v-prediction ZTSNR SDXL -------------------------------------
@pytest.fixture(scope="module")
def sdxl():
    return tiny_sdxl()


class Spy:
    """What FamRun saw in the high-res pass: each FM call's σ, latent before and after and
    reference; each UNet call's σ and the native entry its maps came from."""

    def __init__(self, monkeypatch):
        self.fm, self.maps, self.native = [], [], []
        spy = self
        real_guide, real_ready = FamRun.guide_latent, FamRun._ready_maps
        real_noised = noised_reference

        def guide_latent(run, x, sigma):
            before = x.clone()
            spy.z0, spy.eps, spy.vp, spy.schedule = run._z0, run._eps, run._vp, run.schedule
            real_guide(run, x, sigma)
            spy.fm.append(dict(sigma=sigma, before=before, after=x.clone(), ref=spy._ref))

        def noised(z0, eps, sigma, vp=False):
            spy._ref = real_noised(z0, eps, sigma, vp=vp)
            return spy._ref

        def ready_maps(run, sigma, roles):
            maps, runs = real_ready(run, sigma, roles)
            spy.native = run.record.sigmas
            spy.maps.append((sigma, None if maps is None else maps.entry.sigma))
            return maps, runs

        monkeypatch.setattr(FamRun, "guide_latent", guide_latent)
        monkeypatch.setattr(FamRun, "_ready_maps", ready_maps)
        monkeypatch.setattr("fam.guidance.noised_reference", noised)


def in_dtype(unet, cond, dtype):
    cond.states = cond.states.to(dtype)
    cond.added = {k: v.to(dtype) for k, v in cond.added.items()}
    return unet.to(dtype), cond


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sampler", ["EulerDiscreteScheduler", "DDIMScheduler"])
def test_engine_first_and_last_steps_against_float64(monkeypatch, dtype, sampler):
    """v-prediction + ZTSNR (trailing) on the tiny SDXL, native 3 steps, high-res 4: at the
    first (σ_max = 4096, or ∞ for DDIM) and the last high-res step, the re-noised reference,
    ρ, the FM'd latent, the model's input and the chosen native step against float64."""
    spy = Spy(monkeypatch)
    inputs = []
    unet, cond = in_dtype(tiny_sdxl(), cfg_cond("sdxl", hw=(64, 64)), dtype)
    hook = unet.register_forward_pre_hook(lambda m, a: inputs.append(a[0].clone()))
    try:
        r = generate(unet, getattr(diffusers, sampler)(**V_ZTSNR), cond, native_hw=(8, 8),
                     hires_hw=(16, 16), steps=3, hires_steps=4, params=ON)
    finally:
        hook.remove()
    assert torch.isfinite(r.native).all() and torch.isfinite(r.hires).all()
    assert r.run.am_calls > 0 and not r.run.am_skipped and r.run.fm_calls == 4
    ac = getattr(diffusers, sampler)(**V_ZTSNR).alphas_cumprod
    hires_inputs = inputs[3:]             # after the native pass's 3 calls
    first_sigma = math.inf if sampler == "DDIMScheduler" else 4096.0
    assert spy.fm[0]["sigma"] == first_sigma
    for k in (0, -1):
        step = spy.fm[k]
        sigma = step["sigma"]
        rho = t_reference(ac, sigma) / 1000
        assert spy.schedule.rho(sigma) == pytest.approx(rho, abs=1e-9)
        ref64 = noised64(spy.z0, spy.eps, sigma, spy.vp)
        assert max_ulps(step["ref"], ref64, dtype) <= REF_ULPS[dtype]
        fm64 = fm_reference(step["before"].double(), step["ref"].double(), rho, (8, 8), 0.5)
        assert max_ulps(step["after"], fm64, dtype) <= FM_ULPS[dtype]
        # the model sees the FM'd latent, scaled by 1/√(σ² + 1) in σ space (2 rows: CFG)
        scale = 1.0 if spy.vp else 1 / math.sqrt(sigma * sigma + 1)
        model_in = step["after"].double() * scale
        assert max_ulps(hires_inputs[k][:1], model_in, dtype) <= 1
        # the native step AM took its maps from
        native = spy.native
        hires_sigma, chosen = spy.maps[k]
        assert hires_sigma == sigma and chosen == log_nearest64(native, sigma)
    assert spy.maps[0][1] == max(spy.native)


@pytest.mark.parametrize("sampler", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_v_prediction_ztsnr_multistep_samplers_are_finite_with_am_and_fm(sdxl, sampler):
    """VP samplers that take σ_max = 4096 from their own table (UniPC with its corrector)."""
    r = generate(sdxl, getattr(diffusers, sampler)(**V_ZTSNR), cfg_cond("sdxl", hw=(64, 64)),
                 native_hw=(8, 8), hires_hw=(16, 16), steps=3, params=ON)
    assert torch.isfinite(r.native).all() and torch.isfinite(r.hires).all()
    assert r.run.am_calls > 0 and not r.run.am_skipped and r.info == {} and r.run.fm_calls >= 3


def test_plain_hires_from_an_infinite_sigma_starts_from_the_noise(sdxl, monkeypatch):
    """Without FAM the engine still re-noises z̃₀ to the first σ: ∞ on DDIM's ZTSNR table."""
    starts = []
    real = diffusers.DDIMScheduler.scale_model_input
    monkeypatch.setattr(diffusers.DDIMScheduler, "scale_model_input",
                        lambda self, x, t=None: starts.append(x) or real(self, x, t))
    r = generate(sdxl, diffusers.DDIMScheduler(**V_ZTSNR), cfg_cond("sdxl", hw=(64, 64)),
                 native_hw=(8, 8), hires_hw=(16, 16), steps=2, params=FamParams(enabled=False))
    assert torch.isfinite(r.hires).all()
    g = torch.Generator("cpu").manual_seed(0)            # the engine's draws: native noise, ε
    torch.randn((1, 4, 8, 8), generator=g)
    eps = torch.randn((1, 4, 16, 16), generator=g)
    assert torch.equal(starts[2][:1], eps)               # after the native pass's 2 calls


def test_v_prediction_ztsnr_generation_at_2x_fm_pulls_the_low_band_to_the_native_image(sdxl):
    """A full FAM generation at 2× with the v-prediction ZTSNR Euler (σ_max 4096): finite, AM
    in every high-res call, FM at every step, and the low band follows the native image."""
    def go(params):
        return generate(sdxl, diffusers.EulerDiscreteScheduler(**V_ZTSNR), cfg_cond("sdxl"),
                        native_hw=(16, 16), hires_hw=(32, 32), steps=4, params=params)
    fm, no_fm = go(ON), go(ON.replace(fm_enabled=False))
    for r in (fm, no_fm):
        assert torch.isfinite(r.native).all() and torch.isfinite(r.hires).all()
        assert r.run.am_calls == 4 * len(discover(sdxl).am_layers())
        assert not r.run.am_skipped and r.info == {}
    assert fm.run.fm_calls == 4 and no_fm.run.fm_calls == 0
    z0 = upsample_latent(fm.native, fm.hires.shape[-2:])
    inside = torch.fft.ifftshift(highpass_box((32, 32), (16, 16), 0.0, 0.5)) < 1
    dist = lambda z: (torch.fft.fft2(z.double()) - torch.fft.fft2(z0.double()))[..., inside].abs().mean()
    assert dist(fm.hires) < 0.5 * dist(no_fm.hires), (dist(fm.hires), dist(no_fm.hires))
