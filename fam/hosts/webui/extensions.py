"""Other extensions of the same job, read from what every WebUI keeps on `p`: its always-on
scripts (`p.scripts.alwayson_scripts`, each with its slice `args_from:args_to` of
`p.script_args`). Extensions are found by title, never imported, and read here at `p.sample`
time, after every script's `process`, so the load order of extensions (which follows their
directory names) changes nothing.

`refusal` names what FAM cannot run beside: extensions that denoise in tiles or rewrite the
UNet's self-attention or its block resolutions. FAM's AM compares each high-res token grid
with the native one; these change the grids or the attention it modulates."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

from ..webui_args import FamRequestError

__all__ = ["alwayson", "find_script", "script_enabled", "refusal", "patcher_refusal"]


def alwayson(p) -> Iterator[tuple[str, Any, Sequence[Any]]]:
    """(lower-case title, script, its args) of each always-on script of p's job."""
    runner = getattr(p, "scripts", None)
    args = getattr(p, "script_args", None) or ()
    for script in getattr(runner, "alwayson_scripts", None) or ():
        try:
            title = str(script.title()).strip().lower()
        except Exception:   # a script whose title fails is none of the ones named here
            continue
        lo, hi = getattr(script, "args_from", None), getattr(script, "args_to", None)
        mine = tuple(args[lo:hi]) if isinstance(lo, int) and isinstance(hi, int) else ()
        yield title, script, mine


def find_script(p, title: str) -> tuple[Any, Sequence[Any]] | tuple[None, tuple]:
    """The always-on script whose title starts with `title` (case-insensitive: the Forge
    forks rename slightly), and its args."""
    want = title.lower()
    for name, script, args in alwayson(p):
        if name.startswith(want):
            return script, args
    return None, ()


def script_enabled(args: Sequence[Any]) -> bool:
    """The on/off switch, which each script named here has as its first arg."""
    return bool(args) and args[0] is True


def _units(args: Sequence[Any]) -> Iterator[Any]:
    """ControlNet's enabled units (objects in the UI, dicts through the API, where a unit
    without "enabled" is on, as ControlNet reads it)."""
    for unit in args:
        if isinstance(unit, dict):
            get = unit.get
            on = get("enabled", True)
        else:
            get = (lambda k, d=None, u=unit: getattr(u, k, d))
            on = get("enabled", False)
        if on is True:
            yield get


_TILED = {"tiled diffusion": "Tiled Diffusion (MultiDiffusion / Mixture of Diffusers)",
          "demofusion": "DemoFusion"}
_AM_CONFLICTS = {   # title prefix: why AM cannot run beside it
    "kohya hrfix": "it changes the resolution of the UNet's blocks, so the high-res token grids "
                   "no longer match the native ones",
    "stylealign": "it shares self-attention across the batch",
    "multidiffusion": "it denoises the image in tiles, and FAM's AM modulates the whole image",
}


def _am_refusal(name: str, why: str) -> FamRequestError:
    return FamRequestError(
        f"FAM's Attention Modulation cannot run with {name}: {why}. Turn {name} off, "
        "or set FAM AM off (FM then runs alone).")


def patcher_refusal(model_options: dict) -> FamRequestError | None:
    """The same conflicts read from what a model patcher's UNet carries (Forge), whatever
    a fork titles the extension: MultiDiffusion's flag, Kohya HRFix's block patch,
    StyleAlign's attention."""
    if model_options.get("tiled_diffusion") is True:
        return _am_refusal("MultiDiffusion Integrated", _AM_CONFLICTS["multidiffusion"])
    to = model_options.get("transformer_options") or {}
    patches = to.get("patches") or {}
    for kind in ("input_block_patch", "input_block_patch_after_skip"):
        if any(getattr(f, "__qualname__", "").startswith("PatchModelAddDownscale")
               for f in patches.get(kind) or ()):
            return _am_refusal("Kohya HRFix Integrated", _AM_CONFLICTS["kohya hrfix"])
    replaced = (to.get("patches_replace") or {}).get("attn1") or {}
    if any("StyleAlign" in getattr(f, "__qualname__", "") for f in replaced.values()):
        return _am_refusal("StyleAlign Integrated", _AM_CONFLICTS["stylealign"])
    return None


def refusal(p, am_active: bool) -> FamRequestError | None:
    """What FAM refuses to run beside in this job, named, or None."""
    for title, name in _TILED.items():
        script, args = find_script(p, title)
        if script is not None and (script_enabled(args)
                                   or "create_sampler_original_md" in type(script).__dict__):
            return FamRequestError(
                f"FAM Diffusion cannot run together with {name}: it denoises the image in "
                f"tiles, and FAM guides the whole image. Turn {name.split(' (')[0]} off "
                "(Tiled VAE can stay on), or turn FAM off.")
    if not am_active:
        return None
    for title, why in _AM_CONFLICTS.items():
        script, args = find_script(p, title)
        if script is not None and script_enabled(args):
            return _am_refusal(script.title(), why)
    script, args = find_script(p, "controlnet")
    for get in _units(args) if script is not None else ():
        module = str(get("module", "") or "")
        if module.startswith("reference"):
            return FamRequestError(
                f"FAM's Attention Modulation cannot run with a ControlNet {module} unit: it "
                "rewrites the UNet's self-attention. Turn that unit off, or set FAM AM off "
                "(FM then runs alone).")
    return None

