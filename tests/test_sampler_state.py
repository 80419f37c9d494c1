"""FM reaches the latent each sampler step starts from (docs/method.md §1 step 4), diffusers host."""

import diffusers
import pytest
import torch

from conftest import SCHED_KW, cfg_cond
from fam.guidance import FamRun
from fam.hosts.diffusers import generate
from fam.params import FamParams


@pytest.mark.parametrize("name", ["UniPCMultistepScheduler", "DPMSolverMultistepScheduler",
                                  "EulerDiscreteScheduler"])
def test_the_state_each_step_starts_from_is_the_fm_latent(unets, monkeypatch, name):
    """UniPC's corrector rebuilds the latent inside `step()`; what it keeps as `last_sample`
    (its next step's start) must be a latent FM edited. The others start from their input."""
    guided, starts = [], []
    guide = FamRun.guide_latent

    def spy(self, x, sigma):
        guided.append(x)
        return guide(self, x, sigma)

    cls = getattr(diffusers, name)
    step = cls.step

    def recording_step(self, model_output, timestep, sample, *a, **k):
        out = step(self, model_output, timestep, sample, *a, **k)
        starts.append(getattr(self, "last_sample", None) if hasattr(self, "last_sample") else sample)
        return out

    monkeypatch.setattr(FamRun, "guide_latent", spy)
    monkeypatch.setattr(cls, "step", recording_step)
    generate(unets["sd15"], cls(**SCHED_KW), cfg_cond("sd15"), native_hw=(16, 16),
             hires_hw=(32, 32), steps=4, params=FamParams(enabled=True, am_enabled=False))
    hires_starts = starts[4:]
    assert len(hires_starts) == 4
    assert all(any(s is g for g in guided) for s in hires_starts)
