"""σ ↔ t on the SD schedule, ρ, and the reference noising in both latent spaces."""

import math

import pytest
import torch

from conftest import SCHED_KW
from fam.schedule import VPSchedule, noised_reference


@pytest.fixture
def sched():
    import diffusers
    return diffusers.DDPMScheduler(**SCHED_KW)


def test_round_trip_and_table_values(sched):
    s = VPSchedule(sched.alphas_cumprod)
    ac = sched.alphas_cumprod.double()
    for t in (0, 1, 17, 500, 998, 999):
        assert s.t_to_sigma(t) == pytest.approx(math.sqrt((1 - ac[t]) / ac[t]), rel=1e-12)
    for t in (0.0, 0.25, 10.5, 731.3, 999.0):
        assert s.sigma_to_t(s.t_to_sigma(t)) == pytest.approx(t, abs=1e-9)
    assert s.sigma_to_t(1e-9) == 0 and s.sigma_to_t(1e9) == 999
    assert s.rho(s.sigma_max) == pytest.approx(0.999) and s.rho(s.sigma_min) == 0


@pytest.mark.parametrize("name", ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
def test_noising_equals_the_schedulers_add_noise(sched, name):
    import diffusers
    sch = getattr(diffusers, name)(**SCHED_KW)
    sch.set_timesteps(10)
    vp = float(sch.init_noise_sigma) <= 1
    s = VPSchedule(sched.alphas_cumprod)
    z0, eps = torch.randn(2, 1, 4, 6, 6, dtype=torch.float64)
    for i, t in enumerate(sch.timesteps[:-1]):
        sigma = float(sch.sigmas[i]) if hasattr(sch, "sigmas") else s.t_to_sigma(float(t))
        expected = sch.add_noise(z0.float(), eps.float(), t.reshape(1)).double()
        torch.testing.assert_close(noised_reference(z0, eps, sigma, vp=vp), expected,
                                   atol=2e-5, rtol=1e-5)
