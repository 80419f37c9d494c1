"""FamParams: defaults, validation naming the field, and every conversion round trip."""

import pytest
from hypothesis import given, strategies as st

from fam.params import FamParamError, FamParams

BAD = [
    ("enabled", 1), ("enabled", "yes"), ("fm_enabled", None), ("am_enabled", 0.0),
    ("full_renoise", "true"), ("record_offload", 1),
    ("fm_cutoff", -0.1), ("fm_cutoff", 1.5), ("fm_cutoff", "0.5"), ("fm_cutoff", float("nan")),
    ("fm_cutoff", True),
    ("am_lambda", -1e-9), ("am_lambda", 1.01), ("am_lambda", None), ("am_lambda", float("inf")),
    ("record_budget_mb", -1), ("record_budget_mb", 10**6), ("record_budget_mb", 1.5),
    ("record_budget_mb", "64"),
    ("am_blocks", ""), ("am_blocks", "first"), ("am_blocks", "3,x"), ("am_blocks", "12"),
    ("am_blocks", "-1"), ("am_blocks", 3), ("am_blocks", ["3"]),
]


def test_defaults_follow_the_spec():
    p = FamParams()
    assert (p.fm_enabled, p.fm_cutoff, p.am_enabled, p.am_lambda, p.am_blocks, p.full_renoise) \
        == (True, 0.5, True, 0.7, "auto", True)
    assert p.enabled is False and p.am_block_indices is None


@pytest.mark.parametrize("name,value", BAD)
def test_every_invalid_value_names_its_field(name, value):
    with pytest.raises(FamParamError) as e:
        FamParams(**{name: value})
    assert e.value.field == name
    assert f"'{name}'" in str(e.value) and repr(value) in str(e.value)


def test_valid_edge_values_and_normalisation():
    p = FamParams(fm_cutoff=0, am_lambda=1, record_budget_mb=0.0 + 64, am_blocks=" 5, 3,4,3 ")
    assert p.am_blocks == "3,4,5" and p.am_block_indices == (3, 4, 5)
    assert FamParams(am_blocks="AUTO").am_blocks == "auto"


def test_from_dict_rejects_unknown_keys_by_name():
    with pytest.raises(FamParamError, match="fm_cutof") as e:
        FamParams.from_dict({"enabled": True, "fm_cutof": 0.4})
    assert e.value.field == "fm_cutof" and "allowed keys" in str(e.value)
    with pytest.raises(FamParamError, match="expected a dict"):
        FamParams.from_dict([True])


def test_positional_order_and_defaults():
    assert FamParams.names() == ["enabled", "fm_enabled", "fm_cutoff", "am_enabled", "am_lambda",
                                 "am_blocks", "full_renoise", "record_budget_mb", "record_offload"]
    p = FamParams.from_positional([True, False, 0.25])
    assert (p.enabled, p.fm_enabled, p.fm_cutoff, p.am_lambda) == (True, False, 0.25, 0.7)
    assert FamParams.from_positional(p.to_positional()) == p
    with pytest.raises(FamParamError, match="at most 9"):
        FamParams.from_positional([True] * 10)


params_strategy = st.builds(
    FamParams, enabled=st.just(True), fm_enabled=st.booleans(),
    fm_cutoff=st.floats(0, 1), am_enabled=st.booleans(), am_lambda=st.floats(0, 1),
    am_blocks=st.one_of(st.just("auto"), st.lists(st.integers(0, 11), min_size=1).map(
        lambda xs: ",".join(map(str, xs)))),
    full_renoise=st.booleans(), record_budget_mb=st.integers(0, 65536),
    record_offload=st.booleans())


@given(params_strategy)
def test_dict_and_infotext_round_trip(p):
    assert FamParams.from_dict(p.to_dict()) == p
    info = p.to_infotext()
    assert all(k.startswith("FAM") for k in info)
    assert FamParams.from_infotext(info) == p
    as_text = {k: str(v) for k, v in info.items()}       # what a PNG info parser hands back
    assert FamParams.from_infotext(as_text) == p


def test_infotext_is_empty_when_off_and_parsing_errors_name_the_field():
    assert FamParams().to_infotext() == {}
    assert FamParams.from_infotext({}) == FamParams()
    with pytest.raises(FamParamError) as e:
        FamParams.from_infotext({"FAM": "True", "FAM AM lambda": "strong"})
    assert e.value.field == "am_lambda"
