"""How FAM settings reach a WebUI script (A1111 and every Forge): the positional UI/API args
or a dict in `args[0]`, the infotext, and XYZ overrides, all decoded into one `FamParams`;
and the error a request the WebUI cannot run raises.

No WebUI import here: the script passes plain values in, so CI tests this directly."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from ..params import FamParamError, FamParams

try:  # every WebUI serves its API with FastAPI (a gradio dependency)
    from fastapi import HTTPException as _QuietApiError
except ImportError:  # CI, standalone use: no web server to keep quiet
    _QuietApiError = Exception

__all__ = ["FamRequestError", "decode_args", "infotext_value", "fields", "XYZ_ATTR",
           "with_xyz_override", "apply_xyz_overrides"]

XYZ_ATTR = "_fam_xyz"  # per-cell overrides live on the XYZ copy of p, never in a global


class FamRequestError(ValueError, _QuietApiError):
    """A FAM request the WebUI cannot run as asked: the user's mistake, not a server error.
    The WebUI API answers any exception with its `status_code` and `detail` (here 422 and the
    message), and logs a traceback for every one that is not FastAPI's `HTTPException`; being
    one, this error reaches the client as a 422 naming the problem and the log stays quiet."""

    def __init__(self, message: str):
        ValueError.__init__(self, message)
        self.status_code = 422
        self.detail = message
        self.headers = None

    def __str__(self) -> str:  # HTTPException would print "422: message"
        return self.detail


def fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(FamParams)


def _is_int(f: dataclasses.Field) -> bool:
    return f.type in ("int", int)


def _coerce(name: str, value: Any) -> Any:
    """Gradio sliders deliver whole numbers as floats (8192.0): give int fields an int."""
    f = next((f for f in fields() if f.name == name), None)
    if f is not None and _is_int(f) and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def decode_args(args: Sequence[Any]) -> FamParams:
    """The script's args as FamParams: a dict in `args[0]` (API; the WebUI fills the other
    slots with UI defaults, which are then ignored) or positional values in field order
    (UI, positional API form). Raises FamRequestError naming the bad key."""
    try:
        if args and isinstance(args[0], Mapping):
            return FamParams.from_dict({k: _coerce(k, v) for k, v in args[0].items()})
        names = FamParams.names()
        return FamParams.from_positional([_coerce(n, v) for n, v in zip(names, args)]
                                         + list(args[len(names):]))
    except FamParamError as e:
        raise FamRequestError(str(e)) from e
    except TypeError as e:  # a non-string dict key
        raise FamRequestError(f"FAM args: {e}") from e


def infotext_value(info: Mapping[str, Any], name: str) -> Any:
    """One setting parsed from infotext fields, or None when absent (paste leaves the
    control unchanged). `enabled` is False when the infotext has no FAM entry, so pasting a
    non-FAM image turns FAM off."""
    f = next(f for f in fields() if f.name == name)
    key = f.metadata["infotext"]
    if key not in info:
        return False if name == "enabled" else None
    try:
        return getattr(FamParams.from_infotext({key: info[key]}), name)
    except FamParamError as e:
        raise FamRequestError(str(e)) from e


def with_xyz_override(p: Any, name: str, value: Any) -> None:
    """XYZ `apply`: store one override on this cell's copy of p (a new dict, since the copy
    is shallow and must not share it with other cells)."""
    f = next(f for f in fields() if f.name == name)
    if isinstance(value, str) and f.type not in ("str", str):  # "True" / "False" choices
        value = infotext_value({f.metadata["infotext"]: value}, name)
    setattr(p, XYZ_ATTR, {**getattr(p, XYZ_ATTR, {}), name: _coerce(name, value)})


def apply_xyz_overrides(params: FamParams, p: Any) -> FamParams:
    overrides = getattr(p, XYZ_ATTR, None)
    if not overrides:
        return params
    try:
        return params.replace(**overrides)
    except FamParamError as e:
        raise FamRequestError(str(e)) from e
