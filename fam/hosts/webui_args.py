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

__all__ = ["FamRequestError", "decode_args", "infotext_value", "screen_pasted_infotext",
           "fields", "XYZ_ATTR", "with_xyz_override", "apply_xyz_overrides"]

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


def _field(name: str) -> dataclasses.Field:
    return next(f for f in fields() if f.name == name)


def _as_request_error(decode):
    """Run one decoding step; whatever goes wrong in it is the request's error (the script
    runner would swallow any other exception, and the user get a plain image)."""
    try:
        return decode()
    except FamRequestError:
        raise
    except FamParamError as e:
        raise FamRequestError(str(e)) from e
    except Exception as e:  # a value no check foresaw: still the request's, never silent
        raise FamRequestError(f"FAM settings could not be read ({type(e).__name__}: {e}); "
                              f"expected a dict of settings ({', '.join(FamParams.names())}) "
                              "in args[0] or these values in this order") from e


def decode_args(args: Sequence[Any]) -> FamParams:
    """The script's args as FamParams: a dict in `args[0]` (API; the WebUI fills the other
    slots with UI defaults, which are then ignored) or positional values in field order
    (UI, positional API form). Raises FamRequestError naming the bad key."""
    def decode():
        if args and isinstance(args[0], Mapping):
            return FamParams.from_dict(args[0])
        return FamParams.from_positional(list(args))
    return _as_request_error(decode)


def infotext_value(info: Mapping[str, Any], name: str) -> Any:
    """One setting parsed from infotext fields, or None when absent or set aside by
    `screen_pasted_infotext` (paste leaves the control unchanged). `enabled` is False when
    the infotext has no FAM entry, so pasting a non-FAM image turns FAM off. A malformed
    value raises FamRequestError: the API's `infotext` field answers 422 naming it."""
    key = _field(name).metadata["infotext"]
    if key not in info:
        return False if name == "enabled" else None
    if info[key] is None:
        return None
    return _as_request_error(lambda: getattr(FamParams.from_infotext({key: info[key]}), name))


def screen_pasted_infotext(infotext: str, params: dict) -> None:
    """The WebUI's `on_infotext_pasted` callback (the UI's paste and PNG Info, not the API):
    a FAM entry that does not parse is set to None, so the paste leaves its control
    unchanged, and one line in the log says which entry was ignored and why."""
    for f in fields():
        key = f.metadata["infotext"]
        if params.get(key) is None:
            continue
        try:
            infotext_value(params, f.name)
        except FamRequestError as e:
            print(f"FAM: pasted infotext entry '{key}' ignored: {e}")
            params[key] = None


def with_xyz_override(p: Any, name: str, value: Any) -> None:
    """XYZ `apply`: store one override on this cell's copy of p (a new dict, since the copy
    is shallow and must not share it with other cells). "True" / "False" choices become
    booleans; a value that does not parse is kept as it is, for `process` to refuse."""
    if isinstance(value, str) and _field(name).type not in ("str", str):
        try:
            value = infotext_value({_field(name).metadata["infotext"]: value}, name)
        except FamRequestError:
            pass
    setattr(p, XYZ_ATTR, {**getattr(p, XYZ_ATTR, {}), name: value})


def apply_xyz_overrides(params: FamParams, p: Any) -> FamParams:
    overrides = getattr(p, XYZ_ATTR, None)
    if not overrides:
        return params
    return _as_request_error(lambda: params.replace(**overrides))
