"""The UNet side of every host that hooks a UNet it does not own (A1111, the Forge family,
ComfyUI): FAM's hooks open a FAM call per UNet batch, keep the native call a replay re-runs,
guard the attn1 layers so only FAM's own UNet calls reach the run, and rebuild native maps
for `FamRun` (recorded native calls, or the reference latent re-noised to σ).

A host subclasses `UNetHooks` with how its hooks go on and come off and how it re-runs one
call; no `p`, no WebUI here."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from ..guidance import NATIVE, FamRun
from ..layers import AttnLayer, UNetLayout
from ..record import Role
from ..replay import ReplayUnavailable
from ..schedule import noised_reference

__all__ = ["GEN_ATTR", "LATENT_FACTOR", "NativeCall", "Reference", "UNetHooks",
           "native_size_call", "same_architecture"]

GEN_ATTR = "_fam_generation"   # on what FAM puts on a host object: the generation it belongs to
LATENT_FACTOR = 8              # pixels per latent cell (SD1/SD2/SDXL VAEs)


class NativeCall(NamedTuple):
    """Replay payload of one recorded native UNet call: what the run keys it by, and the
    host's own `inputs` to run it again."""
    sigma: float
    roles: tuple[Role, ...]
    hw: tuple[int, int]
    inputs: Any


class _Current(NamedTuple):
    """The high-res UNet call being guided: replays run through its model, for its rows."""
    roles: tuple[Role, ...]
    x: torch.Tensor
    inputs: Any


class Reference:
    """Clean native latents (B×C×h×w: img2img's input image, the ✨ button's first-pass image)
    and the pass's noise ε nearest-sampled onto their grid; `at(σ)` is what a native pass
    would have seen at σ (the recompute path without a native pass)."""

    def __init__(self, latents: torch.Tensor, noise: torch.Tensor):
        self.latents = latents.to(noise.device, noise.dtype)
        self.noise = F.interpolate(noise.float(), size=tuple(latents.shape[-2:]),
                                   mode="nearest").to(noise.dtype)

    def at(self, roles: Sequence[Role], sigma: float, vp: bool, dtype: torch.dtype
           ) -> torch.Tensor:
        idx = [r.image for r in roles]
        return noised_reference(self.latents[idx], self.noise[idx], sigma, vp=vp).to(dtype)


@contextlib.contextmanager
def native_size_call():
    """Around a native-size UNet call of a replay. Hooks of other extensions that hold
    high-res inputs (ControlNet's hints) cannot take it: their shape error ends the replays of
    this pass and AM is skipped with that reason, instead of failing the generation."""
    try:
        yield
    except RuntimeError as e:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise ReplayUnavailable(
            f"native-size UNet call failed ({type(e).__name__}: {first}); another "
            "extension's UNet hook may need the high-res size") from e


def same_architecture(a: UNetLayout, b: UNetLayout) -> bool:
    """Whether the native record of one UNet can drive another's AM layers."""
    def sig(layout):
        return [(l.name.split("diffusion_model.")[-1], l.heads, tuple(l.module.to_q.weight.shape))
                for l in layout.layers]
    return sig(a) == sig(b)


class UNetHooks:
    """FAM's hooks on one UNet for one generation. The host's hooks call `open_call` before
    each UNet batch and run the batch through `inside`; the attn1 hooks hand a layer's input
    to the run only `in_unet_call`, so any other use of the UNet (another extension's, a
    preview) passes untouched. `replay` is FamRun's replay function."""

    def __init__(self, run: FamRun, layers: Sequence[AttnLayer]):
        self.run, self.layers = run, tuple(layers)
        self.in_unet_call = False
        self.sigma: float | None = None   # σ of the CFG call in progress, when the host knows it
        self.paused = False      # every call passes through (after a refiner switch)
        self.vp = False          # the UNet's latents are VP latents (timestep denoisers)
        self.reference: Reference | None = None
        self.hires_calls = 0     # high-res UNet batches FAM saw
        self._current: _Current | None = None

    # ---- host hooks ---------------------------------------------------------------------
    def install(self) -> None:
        """Hooks that stay for the whole generation (none by default)."""

    def remove(self) -> None:
        """Everything off; safe to call twice."""
        self._current = self.reference = None

    def set_layers(self, layers: Sequence[AttnLayer]) -> None:
        """The high-res pass runs another UNet of the same architecture."""
        self.layers = tuple(layers)

    def _replay_native(self, call: NativeCall, current: _Current) -> None:
        """Run a recorded native call again, through the model of `current`."""
        raise NotImplementedError

    def _replay_reference(self, z: torch.Tensor, sigma: float, current: _Current) -> None:
        """Run the native-size latent z (the reference at σ) for `current`'s rows."""
        raise NotImplementedError

    # ---- per UNet batch -------------------------------------------------------------------
    def open_call(self, sigma: float, roles: Sequence[Role], x: torch.Tensor, inputs: Any) -> None:
        """A UNet batch begins: recorded in the native pass (with its replay payload), guided
        in the high-res pass."""
        roles, hw = tuple(roles), tuple(x.shape[-2:])
        if self.run.phase == NATIVE:
            self.run.begin_call(sigma, roles, hw, replay=NativeCall(sigma, roles, hw, inputs))
        else:
            self.hires_calls += 1
            self._current = _Current(roles, x, inputs)
            self.run.begin_call(sigma, roles, hw)

    def inside(self, fn: Callable, *args, **kwargs):
        """Run one UNet batch with the attn1 hooks live."""
        self.in_unet_call = True
        try:
            return fn(*args, **kwargs)
        finally:
            self.in_unet_call = False

    def replay(self, payload: NativeCall | float) -> None:
        """FamRun's replay: re-run a recorded native call, or (reference path, payload = σ) run
        the native UNet on the reference re-noised to σ for the current call's rows."""
        current = self._current
        if isinstance(payload, NativeCall):
            self.run.begin_call(payload.sigma, payload.roles, payload.hw)
            with native_size_call():
                self._replay_native(payload, current)
            return
        if len(current.roles) != current.x.shape[0]:
            return  # rows without a role: no maps, the call is skipped and reported
        sigma = float(payload)
        z = self.reference.at(current.roles, sigma, self.vp, current.x.dtype)
        self.run.begin_call(sigma, current.roles, z.shape[-2:])
        with native_size_call():
            self._replay_reference(z, sigma, current)

    def report(self) -> dict[str, str]:
        run = self.run
        if (self.hires_calls and run.params.am_active and not self.paused
                and run.am_calls == 0 and not run.am_skipped):
            return {"FAM note": "AM did not run: the UNet never called its attn1 layers"}
        return {}
