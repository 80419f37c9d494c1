"""The A1111 script's settings paths: API dict / positional args, infotext, XYZ overrides."""

from types import SimpleNamespace

import pytest

from fam.hosts.webui_args import (FamRequestError, apply_xyz_overrides, decode_args,
                                  infotext_value, with_xyz_override)
from fam.params import FamParams

UI_DEFAULTS = FamParams().to_positional()


def test_dict_in_first_slot_ignores_the_default_filled_rest():
    p = decode_args([{"enabled": True, "fm_cutoff": 0.25}, *UI_DEFAULTS[1:]])
    assert p == FamParams(enabled=True, fm_cutoff=0.25)


def test_positional_form_and_slider_floats_for_int_fields():
    args = [True, False, 0.3, True, 0.5, "3, 5,4", False, 1024.0, False]
    p = decode_args(args)
    assert p == FamParams(True, False, 0.3, True, 0.5, "3,4,5", False, 1024, False)
    assert type(p.record_budget_mb) is int


def test_short_positional_form_takes_defaults():
    assert decode_args([True]) == FamParams(enabled=True)
    assert decode_args([]) == FamParams()


@pytest.mark.parametrize("args, key", [
    ([{"enabled": True, "fm_cutof": 0.3}], "fm_cutof"),
    ([{"am_lambda": 1.5}], "am_lambda"),
    ([{"fm_cutoff": "big"}], "fm_cutoff"),
    ([{"enabled": "yes"}], "enabled"),
    ([{"record_budget_mb": 10.5}], "record_budget_mb"),
    ([{"am_blocks": "3,x"}], "am_blocks"),
    ([True, True, 2.0], "fm_cutoff"),
    ([True] * 10, "args"),
])
def test_errors_name_the_key_and_carry_an_http_status(args, key):
    with pytest.raises(FamRequestError, match=f"'{key}'") as e:
        decode_args(args)
    assert e.value.status_code == 422 and key in e.value.detail


def test_infotext_round_trip_through_the_webui_string_form():
    params = FamParams(enabled=True, fm_cutoff=0.35, am_lambda=0.6, am_blocks="3,4",
                       full_renoise=False, record_budget_mb=512, record_offload=False)
    parsed = {k: str(v) for k, v in params.to_infotext().items()}  # what the parser returns
    back = {name: infotext_value(parsed, name) for name in FamParams.names()}
    assert FamParams(**back) == params


def test_infotext_without_fam_turns_it_off_and_leaves_the_rest():
    assert infotext_value({"Steps": "20"}, "enabled") is False
    assert infotext_value({"Steps": "20"}, "am_lambda") is None


def test_bad_infotext_value_names_the_key():
    with pytest.raises(FamRequestError, match="am_lambda"):
        infotext_value({"FAM AM lambda": "lots"}, "am_lambda")


def test_xyz_overrides_stay_on_their_own_cell():
    base = SimpleNamespace()
    cell_a, cell_b = SimpleNamespace(**vars(base)), SimpleNamespace(**vars(base))
    with_xyz_override(cell_a, "am_lambda", 0.2)
    with_xyz_override(cell_a, "enabled", "True")
    with_xyz_override(cell_a, "record_budget_mb", 128.0)
    with_xyz_override(cell_b, "fm_enabled", "False")
    a = apply_xyz_overrides(FamParams(), cell_a)
    b = apply_xyz_overrides(FamParams(), cell_b)
    assert a == FamParams(enabled=True, am_lambda=0.2, record_budget_mb=128)
    assert b == FamParams(fm_enabled=False)
    assert apply_xyz_overrides(FamParams(), base) == FamParams()


def test_xyz_override_out_of_range_is_a_request_error():
    cell = SimpleNamespace()
    with_xyz_override(cell, "fm_cutoff", 3.0)
    with pytest.raises(FamRequestError, match="fm_cutoff"):
        apply_xyz_overrides(FamParams(), cell)
