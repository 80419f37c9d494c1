"""No malformed FAM value slips through: every value of any JSON type, in every field and on
every path a value comes in by (API dict and positional args, infotext, XYZ, the command
line), is accepted as a valid setting or refused with a message naming the field and what
it allows. Anything else would escape as another exception, which the WebUI's script runner
swallows: HTTP 200 and a plain Hires fix without a word."""

import re
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from fam.hosts.webui_args import (FamRequestError, apply_xyz_overrides, decode_args,
                                  infotext_value, screen_pasted_infotext, with_xyz_override)
from fam.params import MAX_OUTPUT_BLOCK, FamParamError, FamParams

NAMES = FamParams.names()
FIELDS = {f.name: f for f in FamParams.__dataclass_fields__.values()}
INFOTEXT_KEY = {n: f.metadata["infotext"] for n, f in FIELDS.items()}

# strings and numbers that have slipped through checks of this kind: digits int() or float()
# take but a user cannot be told about ('３' full-width, '٣' Arabic-Indic, '²' superscript,
# '𝟑' mathematical), numbers beyond a float, float spellings a check may not expect
TRICKY = ["３", "٣", "۳", "३", "²", "①", "𝟑", "3,٤", "١٢", "1e400", "-1e400", "1e-400", "nan",
          "NaN", "inf", "-inf", "Infinity", "0x10", "1_000", " 3 , 4 ", "3,,4", "12", "011",
          "0012", "auto", " AUTO ", "True", "false", "yes", "off", "", " ", "\x00", "8192.0",
          "8192.5", "0.5", ".5", "5.", "+0.3", "-0", "1e3", "1" * 5000, "9" * 400 + ".0",
          '"3,4"', "3;4", "[3]"]
HUGE = [2**63, -2**63, 2**1024, 10**400, -10**400]
TOO_LONG_TO_PRINT = 10**5000      # repr() itself refuses: more than 4300 digits

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from(HUGE),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(TRICKY), st.from_regex(r"[+-]?[0-9]{0,4}(\.[0-9]{0,3})?([eE][+-]?[0-9]{1,3})?",
                                           fullmatch=True))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=5)
# the values are cheap, but a busy 2-core machine makes any generation look slow
relaxed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
texts = st.one_of(st.sampled_from(TRICKY), st.text(max_size=12), scalars.map(str))


def assert_valid(p: FamParams) -> None:
    """An accepted FamParams holds exactly what every consumer expects."""
    for name, f in FIELDS.items():
        v = getattr(p, name)
        assert type(v) is {"bool": bool, "int": int, "float": float, "str": str}[f.type], (name, v)
        if f.type in ("int", "float"):
            assert f.metadata["minimum"] <= v <= f.metadata["maximum"]
    indices = p.am_block_indices
    assert indices is None or all(0 <= i <= MAX_OUTPUT_BLOCK for i in indices)
    assert re.fullmatch(r"auto|[0-9]+(,[0-9]+)*", p.am_blocks)
    assert FamParams.from_dict(p.to_dict()) == p
    shown = {k: str(v) for k, v in p.replace(enabled=True).to_infotext().items()}
    assert FamParams.from_infotext(shown) == p.replace(enabled=True)


def assert_names(message: str, names) -> None:
    """The message names one of `names` and says what is allowed."""
    named = re.search(r"FAM setting '(.*?)' = ", message)
    shown = {repr(n)[1:-1] if isinstance(n, str) else str(n) for n in names}
    assert named, message
    name = named.group(1)
    assert name in shown or (name.endswith("...") and any(n.startswith(name[:-3]) for n in shown)), message
    assert "expected" in message or "allowed" in message, message
    assert len(message) < 600, message


# ---- the settings object itself ---------------------------------------------------------------
@relaxed
@given(st.sampled_from(NAMES), json_values)
def test_any_value_in_any_field_is_accepted_or_refused_by_name(name, value):
    try:
        p = FamParams(**{name: value})
    except FamParamError as e:
        assert e.field == name
        assert_names(str(e), [name])
        return
    assert_valid(p)


@pytest.mark.parametrize("value", ["３", "٣", "²", "①", "3,٤", "١٢", "𝟑"])
def test_am_blocks_takes_ascii_digits_only(value):
    with pytest.raises(FamParamError, match="digits 0-9") as e:
        FamParams(am_blocks=value)
    assert e.value.field == "am_blocks"


@pytest.mark.parametrize("name", ["fm_cutoff", "am_lambda", "record_budget_mb"])
@pytest.mark.parametrize("value", HUGE + [TOO_LONG_TO_PRINT], ids=lambda v: f"{'-' if v < 0 else ''}2^{v.bit_length()}")
def test_integers_beyond_a_float_are_out_of_range(name, value):
    with pytest.raises(FamParamError, match=f"'{name}'"):
        FamParams(**{name: value})


def test_whole_floats_become_ints_and_ints_floats():
    p = FamParams(record_budget_mb=1024.0, fm_cutoff=0, am_lambda=1)
    assert type(p.record_budget_mb) is int and type(p.fm_cutoff) is float
    assert type(p.am_lambda) is float and p.to_dict()["record_budget_mb"] == 1024


# ---- API: the dict in args[0], positional args ------------------------------------------------
@relaxed
@given(st.dictionaries(st.one_of(st.sampled_from(NAMES), st.text(max_size=8)), json_values,
                       max_size=4))
def test_api_dict_is_accepted_or_refused_naming_a_key(d):
    try:
        p = decode_args([d, *FamParams().to_positional()[1:]])
    except FamRequestError as e:
        assert e.status_code == 422
        assert_names(str(e), d)
        return
    assert_valid(p)


@relaxed
@given(st.lists(json_values, max_size=len(NAMES) + 2))
def test_api_positional_args_are_accepted_or_refused_naming_a_field(args):
    try:
        p = decode_args(args)
    except FamRequestError as e:
        named = NAMES + ["args"] + (list(args[0]) if args and isinstance(args[0], dict) else [])
        assert_names(str(e), named)
        return
    assert_valid(p)


def test_non_string_keys_are_refused_by_name():
    with pytest.raises(FamRequestError, match="FAM setting '3'"):
        decode_args([{3: True, "enabled": True}])


def test_any_failure_while_decoding_is_a_request_error(monkeypatch):
    def broken(cls, d):
        raise KeyError("something no check foresaw")
    monkeypatch.setattr(FamParams, "from_dict", classmethod(broken))
    with pytest.raises(FamRequestError, match="could not be read") as e:
        decode_args([{"enabled": True}])
    assert e.value.status_code == 422 and "enabled" in str(e.value)


# ---- infotext: paste (UI) and the API's infotext field ---------------------------------------
@relaxed
@given(st.sampled_from(NAMES), st.one_of(texts, json_values))
def test_infotext_values_are_parsed_or_refused_by_name(name, value):
    info = {INFOTEXT_KEY[name]: value}
    try:
        v = infotext_value(info, name)
    except FamRequestError as e:           # the API's infotext field: 422 naming it
        assert_names(str(e), [name])
        return
    if value is None:                       # an entry a paste set aside: control unchanged
        assert v is None
        return
    assert_valid(FamParams(**{name: v}))


@relaxed
@given(st.dictionaries(st.sampled_from(list(INFOTEXT_KEY.values())), st.one_of(texts, json_values),
                       max_size=4))
def test_a_pasted_infotext_never_raises_and_leaves_malformed_entries_unchanged(info):
    params = dict(info)
    screen_pasted_infotext("", params)
    for name in NAMES:
        v = infotext_value(params, name)   # would be a traceback in the WebUI's log
        if v is not None:
            assert_valid(FamParams(**{name: v}))
        key = INFOTEXT_KEY[name]
        if key in info and info[key] is not None and params[key] is None:
            with pytest.raises(FamRequestError):
                infotext_value(info, name)


def test_a_malformed_entry_is_named_in_one_log_line(capsys):
    params = {"FAM": "True", "FAM AM lambda": "lots", "FAM AM blocks": "٣", "FAM FM cutoff": "0.25"}
    screen_pasted_infotext("", params)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "Traceback" not in "".join(lines)
    assert "'FAM AM lambda'" in lines[0] and "'am_lambda' = 'lots'" in lines[0]
    assert "'FAM AM blocks'" in lines[1] and "'am_blocks'" in lines[1]
    assert [infotext_value(params, n) for n in ("enabled", "am_lambda", "am_blocks", "fm_cutoff")] \
        == [True, None, None, 0.25]


# ---- XYZ ------------------------------------------------------------------------------------
@relaxed
@given(st.sampled_from(NAMES), st.one_of(texts, json_values))
def test_xyz_values_are_accepted_or_refused_by_name_when_the_cell_runs(name, value):
    cell = SimpleNamespace()
    with_xyz_override(cell, name, value)   # XYZ's apply: never raises
    try:
        p = apply_xyz_overrides(FamParams(enabled=True), cell)
    except FamRequestError as e:
        assert_names(str(e), [name])
        return
    assert_valid(p)


# ---- the command line ------------------------------------------------------------------------
CLI_VALUE_FIELDS = [n for n in NAMES if FIELDS[n].type != "bool"]


@relaxed
@given(st.sampled_from(CLI_VALUE_FIELDS), texts)
def test_command_line_values_are_accepted_or_refused_by_name(name, text):
    from fam.standalone.cli import _flag, build_parser, fam_params
    args = build_parser().parse_args([f"{_flag(FIELDS[name])}={text}"])
    try:
        p = fam_params(args)
    except FamParamError as e:
        assert e.field == name
        assert_names(str(e), [name])
        return
    assert_valid(p)
