"""Every user setting of FAM Diffusion, in one frozen object that feeds the UI, the API,
the infotext and XYZ alike (docs/method.md §5 gives the defaults)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

__all__ = ["FamParams", "FamParamError", "AM_BLOCKS_AUTO", "MAX_OUTPUT_BLOCK"]

AM_BLOCKS_AUTO = "auto"
MAX_OUTPUT_BLOCK = 11  # ldm/sgm UNets have at most 12 output blocks (SD1/SD2); SDXL has 9


class FamParamError(ValueError):
    """A FAM setting is invalid; the message names the field, the value and what is allowed."""

    def __init__(self, field_name: str, value: Any, allowed: str):
        self.field = field_name
        super().__init__(f"FAM setting '{field_name}' = {_shown(value)} is invalid: {allowed}")


def _shown(value: Any, limit: int = 80) -> str:
    """The value as the message shows it: its repr, cut short (a request may send megabytes;
    an int too long for a decimal string cannot even be repr'd)."""
    try:
        text = repr(value)
    except ValueError:
        return f"<an integer of {value.bit_length()} bits>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _setting(default, info_key, label, doc, lo=None, hi=None, step=None, advanced=False):
    """`advanced`: an engine internal, shown in the UI's collapsed "Advanced" group."""
    return field(default=default, metadata=dict(
        infotext=info_key, label=label, doc=doc, minimum=lo, maximum=hi, step=step,
        advanced=advanced))


@dataclass(frozen=True)
class FamParams:
    """FAM settings. Positional order (`from_positional`, the WebUI script args) is the field
    order below."""

    enabled: bool = _setting(False, "FAM", "Enable FAM", "Run the high-resolution pass with FAM.")
    fm_enabled: bool = _setting(
        True, "FAM FM", "Frequency Modulation",
        "Take the low frequencies of the high-res latent from the upsampled native image "
        "(global structure).")
    fm_cutoff: float = _setting(
        0.5, "FAM FM cutoff", "FM cutoff c",
        "Size of the guided low-frequency box as a fraction of the native latent size.",
        0.0, 1.0, 0.05)
    am_enabled: bool = _setting(
        True, "FAM AM", "Attention Modulation",
        "Blend the native self-attention maps into the high-res ones (coherent local texture).")
    am_lambda: float = _setting(
        0.7, "FAM AM lambda", "AM lambda",
        "Weight of the native attention maps: 0 = plain attention, 1 = native maps only.",
        0.0, 1.0, 0.05)
    am_blocks: str = _setting(
        AM_BLOCKS_AUTO, "FAM AM blocks", "AM blocks",
        "'auto' (the first up-block with attention) or comma-separated ldm output block "
        "indices, e.g. '3,4,5'.")
    full_renoise: bool = _setting(
        True, "FAM full re-noise", "Full re-noise",
        "Re-noise the upsampled native latent to the start of the schedule (hires denoising "
        "strength 1.0, as in the paper); off keeps the chosen denoising strength.")
    record_budget_mb: int = _setting(
        8192, "FAM record budget", "Record budget (MiB)",
        "Memory the native attention record may take; above it the native UNet is re-run "
        "at each high-res step instead (exact, slower). Lower it only if the high-res pass "
        "runs out of memory (0 always re-runs).", 0, 65536, 64, advanced=True)
    record_offload: bool = _setting(
        True, "FAM record offload", "Keep record in RAM",
        "On a GPU, keep the native record in CPU memory and copy one step at a time "
        "(saves VRAM; the next step's part is copied while the current step runs). Turn it "
        "off only with VRAM to spare for the whole record, to save those copies.",
        advanced=True)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _checked(f, getattr(self, f.name)))

    # ---- derived -------------------------------------------------------------------
    @property
    def am_block_indices(self) -> tuple[int, ...] | None:
        """The chosen output-block indices, or None for the architecture's default."""
        if self.am_blocks == AM_BLOCKS_AUTO:
            return None
        return tuple(int(s) for s in self.am_blocks.split(","))

    @property
    def am_active(self) -> bool:
        """Whether AM changes anything: with it off or λ = 0 nothing is recorded or replayed."""
        return self.am_enabled and self.am_lambda > 0

    @property
    def record_budget_bytes(self) -> int:
        return self.record_budget_mb * 2**20

    # ---- conversions ---------------------------------------------------------------
    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "FamParams":
        if not isinstance(d, Mapping):
            raise FamParamError("args", d, "expected a dict of FAM settings")
        unknown = [k for k in d if k not in cls.names()]
        if unknown:
            raise FamParamError(
                _key_name(unknown[0]), d[unknown[0]],
                f"unknown key(s) {_shown(unknown)}; allowed keys: {', '.join(cls.names())}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_positional(cls, args: Sequence[Any]) -> "FamParams":
        """Positional values in field order; missing trailing values take their defaults."""
        names = cls.names()
        if len(args) > len(names):
            raise FamParamError(
                "args", list(args),
                f"expected at most {len(names)} positional values ({', '.join(names)})")
        return cls(**dict(zip(names, args)))

    def to_positional(self) -> list[Any]:
        return [getattr(self, n) for n in self.names()]

    def to_infotext(self) -> dict[str, Any]:
        """Infotext entries ("FAM …" keys); empty when FAM is off."""
        if not self.enabled:
            return {}
        return {f.metadata["infotext"]: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_infotext(cls, info: Mapping[str, Any]) -> "FamParams":
        """Inverse of `to_infotext`, from parsed infotext values (strings or typed)."""
        values = {}
        for f in dataclasses.fields(cls):
            key = f.metadata["infotext"]
            if key in info:
                values[f.name] = _parse_text(f, info[key])
        return cls(**values)

    def replace(self, **changes) -> "FamParams":
        return dataclasses.replace(self, **changes)


def _key_name(key: Any) -> str:
    """An unknown key as the message names it: printable, short."""
    text = repr(key)[1:-1] if isinstance(key, str) else _shown(key)
    return text if len(text) <= 40 else text[:37] + "..."


def _checked(f: dataclasses.Field, v: Any) -> Any:
    """The value of field f, normalised (int fields hold ints, am_blocks its canonical
    form), or FamParamError naming the field and what it allows."""
    if f.type in ("bool", bool):
        if not isinstance(v, bool):
            raise FamParamError(f.name, v, "expected true or false")
        return v
    if f.type in ("str", str):
        return _normalise_blocks(v, f.name)
    is_int = f.type in ("int", int)
    allowed = _number_allowed(f)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise FamParamError(f.name, v, allowed)
    # compare before converting: an int too large for a float is simply out of range
    lo, hi = f.metadata["minimum"], f.metadata["maximum"]
    if (isinstance(v, float) and not math.isfinite(v)) or not lo <= v <= hi:
        raise FamParamError(f.name, v, allowed)
    if is_int:
        if v != int(v):
            raise FamParamError(f.name, v, allowed)
        return int(v)
    return float(v)


def _number_allowed(f: dataclasses.Field) -> str:
    kind = "an integer" if f.type in ("int", int) else "a number"
    return f"expected {kind} in [{f.metadata['minimum']}, {f.metadata['maximum']}]"


def _blocks_allowed() -> str:
    return (f"expected '{AM_BLOCKS_AUTO}' or comma-separated output block indices "
            f"0-{MAX_OUTPUT_BLOCK} (digits 0-9), e.g. '3,4,5'")


_BLOCK_INDEX = re.compile(r"[0-9]{1,3}")   # ASCII digits: int() would take '３' or '٣' too


def _normalise_blocks(v: Any, name: str = "am_blocks") -> str:
    if not isinstance(v, str):
        raise FamParamError(name, v, _blocks_allowed())
    s = v.strip().lower()
    if s == AM_BLOCKS_AUTO:
        return s
    parts = [p.strip() for p in s.split(",") if p.strip()]
    if not parts or not all(_BLOCK_INDEX.fullmatch(p) and int(p) <= MAX_OUTPUT_BLOCK
                            for p in parts):
        raise FamParamError(name, v, _blocks_allowed())
    return ",".join(str(i) for i in sorted({int(p) for p in parts}))


_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")   # ASCII only


def _parse_text(f: dataclasses.Field, raw: Any) -> Any:
    """An infotext / command-line value for field f: strings are parsed (numbers in plain
    ASCII notation, booleans as True/False and the like); any other value is passed on to
    the field's check as it is."""
    if not isinstance(raw, str):
        return raw
    s = raw.strip()
    if f.type in ("bool", bool):
        if s.lower() in ("true", "1", "yes", "on"):
            return True
        if s.lower() in ("false", "0", "no", "off"):
            return False
        raise FamParamError(f.name, raw, "expected True or False")
    if f.type in ("str", str):
        return s.strip('"')
    if not _NUMBER.fullmatch(s):
        raise FamParamError(f.name, raw, _number_allowed(f))
    return float(s)
