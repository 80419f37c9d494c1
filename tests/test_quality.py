"""CI guard: FAM's effect on a model that has learned something.

Every other test checks equations and plumbing on random weights; this one samples the
shipped world-1 model (one disc per 32 px image, fam/toy) at 2× with fixed seeds and asserts
that FAM keeps the native image's disc where plain Hires fix at strength 1.0 duplicates and
fuses discs. A change that breaks FAM's effect (FM not applied, the wrong reference, the
wrong σ) fails here even when every equation test passes; with FM off, FAM's images are the
Hires fix's (same noise), so the gap below is 0.

Measured (seed 0, batch 16, torch 2.13.0 CPU; docs/quality.md): the native pass gives one
round disc in 6 of 16 images (the shipped model is trained for 1500 steps; its grainy,
tinted backgrounds fail the others); FAM keeps all 6 in the native layout and has one round
disc in 9 of 16; Hires fix in 3 of 16 and keeps none of the 6. The binomial standard error
of a rate over 16 images is up to 0.125, of the FAM − Hires fix gap about 0.16: the bounds
sit about 1.2 of those below the measured values and far above what a broken FAM gives.
"""

import math

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("safetensors")

from fam.toy import load
from fam.toy.metrics import score

SEED, BATCH, SCALE = 0, 16, 2
KEEP_MIN = 0.8          # FAM keeps ≥ 80 % of the native round discs in place (measured 6/6)
FAM_MIN = 0.4           # FAM: one round disc (measured 9/16 = 0.56)
GAP_MIN = 3 / 16        # FAM − Hires fix, one round disc (measured 6/16 = 0.375)
HIRES_KEEP_MAX = 0.5    # the failure is real: Hires fix keeps few native discs (measured 0/6)


@pytest.fixture(scope="module")
def counts():
    model = load("disc")
    imgs = model.render(["native", "hires_1.0", "fam"], SCALE, SEED, BATCH)
    native = imgs["native"].permute(0, 2, 3, 1).numpy()
    out = {"native": sum(score("disc", n, n, 1)["one_round_disc"] for n in native)}
    for m in ("hires_1.0", "fam"):
        scores = [score("disc", a, n, SCALE)
                  for a, n in zip(imgs[m].permute(0, 2, 3, 1).numpy(), native)]
        out[m] = {k: sum(s[k] for s in scores) for k in scores[0]}
    return out


def test_fam_keeps_the_native_disc_where_hires_fix_breaks_it(counts):
    c = counts
    assert c["native"] >= 4, c              # the model still draws discs at its own size
    assert c["fam"]["matches_native"] >= math.ceil(KEEP_MIN * c["native"]), c
    assert c["fam"]["one_round_disc"] / BATCH >= FAM_MIN, c
    assert (c["fam"]["one_round_disc"] - c["hires_1.0"]["one_round_disc"]) / BATCH >= GAP_MIN, c
    assert c["hires_1.0"]["matches_native"] <= HIRES_KEEP_MAX * c["native"], c
