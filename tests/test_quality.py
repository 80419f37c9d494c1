"""CI guard: FAM's effect on a model that has learned something.

Every other test checks equations and plumbing on random weights; this one samples the
shipped world-1 model (one disc per 32 px image, fam/toy) at 2× with fixed seeds and asserts
that FAM keeps the native image's disc where plain Hires fix at strength 1.0 duplicates and
fuses discs. A change that breaks FAM's effect (FM not applied, the wrong reference, the
wrong σ) fails here even when every equation test passes; with FM off, FAM's images are the
Hires fix's (same noise), so the gap below is 0.

Measured with the shipped model (batch 16, seeds 0–3 = 64 images, 2 threads, torch 2.13.0
CPU; docs/quality.md), per seed of 16 images:

    native pass: one round disc              10  13  14  15   (mean 13.0, SD 2.2)
    FAM: one round disc in the native layout  9  13  14  15   (mean 12.8, SD 2.6)
    Hires fix 1.0: the same                   1   0   1   3   (mean 1.3, SD 1.3)
    FAM − Hires fix                           8  13  13  12   (mean 11.5, SD 2.4)
    FAM keeps of the native discs           0.9   1   1   1

The test runs seed 0, the lowest of the four; every bound sits at least 2.2 seed SDs
below the seed mean (above it for Hires fix) and at or below seed 0's value, and far from
what a broken FAM gives: with FM off the gap is about 0 (AM only keeps 1, 0, 1 and 4).
"""

import math

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from fam.toy import load
from fam.toy.metrics import score

SEED, BATCH, SCALE = 0, 16, 2
NATIVE_MIN = 7          # the model draws one disc at its own size (measured 10; mean 13)
KEEP_MIN = 0.8          # FAM keeps ≥ 80 % of the native round discs in place (0.9–1.0)
FAM_MIN = 7             # FAM: one round disc in the native layout (measured 9; mean 12.8)
GAP_MIN = 6             # FAM − Hires fix on that (measured 8; mean 11.5)
HIRES_KEEP_MAX = 0.4    # the failure is real: Hires fix keeps few native discs (0–0.2)


@pytest.fixture(scope="module")
def counts():
    model = load("disc")
    imgs = model.render(["native", "hires_1.0", "fam", "am_only"], SCALE, SEED, BATCH)
    native = imgs["native"].permute(0, 2, 3, 1).numpy()
    out = {"native": sum(score("disc", n, n, 1)["one_round_disc"] for n in native)}
    for m in ("hires_1.0", "fam", "am_only"):
        scores = [score("disc", a, n, SCALE)
                  for a, n in zip(imgs[m].permute(0, 2, 3, 1).numpy(), native)]
        out[m] = {k: sum(s[k] for s in scores) for k in scores[0]}
    return out


def test_fam_keeps_the_native_disc_where_hires_fix_breaks_it(counts):
    c = counts
    fam, hires = c["fam"]["matches_native"], c["hires_1.0"]["matches_native"]
    assert c["native"] >= NATIVE_MIN, c
    assert fam >= math.ceil(KEEP_MIN * c["native"]), c
    assert fam >= FAM_MIN, c
    assert fam - hires >= GAP_MIN, c
    assert hires <= HIRES_KEEP_MAX * c["native"], c


def test_the_guard_catches_fam_without_fm(counts):
    """FAM with FM off (what a broken FM path gives) fails the bounds above."""
    c = counts
    broken, hires = c["am_only"]["matches_native"], c["hires_1.0"]["matches_native"]
    assert broken < FAM_MIN and broken - hires < GAP_MIN, c
