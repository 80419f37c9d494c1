"""FAM with A1111's SDXL refiner switch, live, on every WebUI whose URL is set that has the
refiner fields and lists a checkpoint named "…refiner…". FAM records the base model's maps
only: AM runs where the base model ran the native step, and `FAM note` says where it did not
(after a switch in the first pass `FAM AM skipped` counts the hires calls without a map)."""

import pytest

from client import infotext
from combos import FIRST, check, plain_unchanged, webui  # noqa: F401

TXT = "/sdapi/v1/txt2img"
NOTES = {"first pass": "the refiner ran the first pass from σ",
         "second pass": "AM off from the refiner switch at σ"}
SKIPPED = {"first pass": "no native record for this step", "second pass": None}


def body(host, where, fam_args=None):
    b = host.body("sdxl", fam_args=fam_args, steps=4, hr_second_pass_steps=4,
                  refiner_checkpoint=host.refiner(), refiner_switch_at=0.5)
    b["override_settings"]["hires_fix_refiner_pass"] = where
    return b


@pytest.mark.parametrize("where", list(NOTES))
def test_refiner_switch_with_fam(webui, where):
    r = webui.generate(**body(webui, where, {}))
    check(r, 2 * FIRST, note=NOTES[where], skipped=SKIPPED[where])
    assert f"Refiner: {webui.refiner()}" in infotext(r)


def test_plain_refiner_unchanged_by_a_fam_run(webui):
    r = plain_unchanged(webui, TXT, body(webui, "second pass"), body(webui, "second pass", {}))
    check(r, 2 * FIRST, note=NOTES["second pass"])
