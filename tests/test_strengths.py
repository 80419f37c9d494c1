"""Every sampler `python -m fam generate` offers converges at every denoising strength, FAM
and plain Hires fix alike, on the shipped toy model (a model that has learned something, so
a pass that never denoises shows as static, not as one more random picture).

"Converged" is measured: the high-frequency energy of an image (its mean squared difference
from its own 3×3 box blur) against the native image's. A toy image is flat discs on black,
its energy sits on the edges, and the upscaled image is smoother still: measured 0.27-1.37×
the native's over every cell here (Heun the highest: 6 steps of a second-order sampler leave
some grain). A high-res pass that starts inside a Heun step never denoises: 14× the native's
at strength 0.3 and 53× at 0.5 (the engine before the fix). The bound, 3×, lies between."""

import pytest
import torch
import torch.nn.functional as F

from fam.params import FamParams

STRENGTHS = (0.3, 0.5, 0.75, 1.0)
BOUND = 3                            # hires energy / native energy
NATIVE, HIRES, STEPS = 32, 48, 6     # 6 steps: the four strengths start at four different steps


def high_frequency_energy(images: torch.Tensor) -> torch.Tensor:
    """Per image (B, C, H, W in [0, 1]): mean squared difference from the 3×3 box blur."""
    blur = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return (images - blur).pow(2).mean((1, 2, 3))


@pytest.fixture(scope="module")
def toy():
    pytest.importorskip("diffusers")
    from fam.standalone.models import load_model
    threads = torch.get_num_threads()
    yield load_model("toy:disc", device=torch.device("cpu"), dtype=torch.float32)
    torch.set_num_threads(threads)   # the toy model runs on one thread, as the CLI does


def _sampler_names():
    from fam.standalone.models import SAMPLERS
    return list(SAMPLERS)


@pytest.mark.parametrize("sampler", _sampler_names())
def test_every_cli_sampler_converges_at_every_strength(toy, sampler):
    from fam.hosts.diffusers import generate
    from fam.standalone.models import make_sampler
    from fam.toy.model import to_image
    cond = toy.conditioning("", "", 1, None)
    failed = []
    for strength in STRENGTHS:
        for label, params in (("plain", FamParams()),
                              ("FAM", FamParams(enabled=True, full_renoise=False))):
            r = generate(toy.unet, make_sampler(toy, sampler), cond, native_hw=(NATIVE,) * 2,
                         hires_hw=(HIRES,) * 2, steps=STEPS, params=params, guidance_scale=1.0,
                         seed=0, denoising_strength=strength)
            native, hires = (float(high_frequency_energy(to_image(z))) for z in (r.native, r.hires))
            if not hires <= BOUND * native:
                failed.append(f"{label} at {strength}: {hires:.4f} (native {native:.4f})")
    assert not failed, f"{sampler}: unconverged high-res images: {'; '.join(failed)}"
