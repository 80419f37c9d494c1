"""The σ clock shared by every host: σ ↔ model timestep t for discrete VP schedules, FM's ρ,
and the noising of the reference latent (docs/method.md §1 step 3, §2).

Zero-terminal-SNR (ZTSNR) schedules end at ᾱ_T = 0, σ = ∞. The WebUIs pin ᾱ_T to
4.8973451890853435e-08 (σ_max ≈ 4518.76), diffusers' Euler, DPM++ and UniPC to 2⁻²⁴
(σ_max = 4096), and diffusers' DDIM keeps ᾱ_T = 0. Everything here works from σ as a Python
float (σ_max² ≈ 2·10⁷ is out of fp16's range), accepts σ = ∞, and never makes a NaN."""

from __future__ import annotations

import bisect
import math

import torch

__all__ = ["VPSchedule", "noised_reference", "log_sigma", "SIGMA_OF_INFINITY"]

# Where σ = ∞ stands among finite σ when t is interpolated and native steps are matched: at
# the smallest clamp of it in use (diffusers' ᾱ_T = 2⁻²⁴, σ = 4096). Every clamp of ∞ (this
# one, the WebUIs' 4518.76) is then t = T − 1 on a table that ends at ∞ and matches its top step.
SIGMA_OF_INFINITY = math.sqrt((1 - 2.0 ** -24) / 2.0 ** -24)


def log_sigma(sigma: float) -> float:
    """log σ as a finite position on the σ axis (σ = ∞ at `SIGMA_OF_INFINITY`, σ ≤ 10⁻¹² at
    10⁻¹²), for interpolation and nearest-step matching."""
    sigma = float(sigma)
    if math.isnan(sigma):
        raise ValueError("σ is NaN")
    if sigma == math.inf:
        sigma = SIGMA_OF_INFINITY
    return math.log(max(sigma, 1e-12))


class VPSchedule:
    """Discrete VP schedule given by its ᾱ table (T entries): σ_t = √((1 − ᾱ_t)/ᾱ_t), ∞ where
    ᾱ_t = 0. Continuous t by linear interpolation in log σ, as k-diffusion's discrete
    denoisers do; a σ = ∞ entry is interpolated as `SIGMA_OF_INFINITY`. The conversions run
    on Python floats: a call reads no tensor."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten().cpu()
        self.num_train_timesteps = ac.numel()
        sigmas = ((1 - ac) / ac) ** 0.5
        self.log_sigmas = sigmas.log()
        self._sigmas: list[float] = sigmas.tolist()
        self._knots = [log_sigma(s) for s in self._sigmas]
        if any(b <= a for a, b in zip(self._knots, self._knots[1:])):
            raise ValueError("VPSchedule: σ must increase strictly with t")

    @property
    def sigma_min(self) -> float:
        return self._sigmas[0]

    @property
    def sigma_max(self) -> float:
        return self._sigmas[-1]

    def sigma_to_t(self, sigma: float) -> float:
        sigma = float(sigma)
        x, ls = log_sigma(sigma), self._knots
        if x <= ls[0]:
            return 0.0
        if x >= ls[-1] or sigma == math.inf:
            return float(self.num_train_timesteps - 1)
        lo = bisect.bisect_left(ls, x) - 1
        return lo + (x - ls[lo]) / (ls[lo + 1] - ls[lo])

    def t_to_sigma(self, t: float) -> float:
        """σ of t: the table's own σ at integer t (∞ where ᾱ_t = 0), interpolated between."""
        t = min(max(float(t), 0.0), self.num_train_timesteps - 1.0)
        lo = int(math.floor(t))
        frac = t - lo
        if frac == 0:
            return self._sigmas[lo]
        return math.exp((1 - frac) * self._knots[lo] + frac * self._knots[lo + 1])

    def rho(self, sigma: float) -> float:
        """ρ = t / T (docs/method.md §2), with T the number of training timesteps."""
        return self.sigma_to_t(sigma) / self.num_train_timesteps


def _vp_coefficients(sigma: float) -> tuple[float, float]:
    """(√ᾱ, √(1 − ᾱ)) with ᾱ = 1/(1 + σ²), without forming σ²: (1, 0) at σ = 0, (0, 1) at ∞."""
    if sigma <= 1:
        a = 1 / math.hypot(1.0, sigma)
        return a, sigma * a
    b = 1 / math.hypot(1.0, 1 / sigma)
    return b / sigma, b


def noised_reference(z0: torch.Tensor, eps: torch.Tensor, sigma: float,
                     vp: bool = False) -> torch.Tensor:
    """z̃_σ = z̃₀ + σ·ε in σ-space; in VP space √ᾱ·z̃₀ + √(1 − ᾱ)·ε with ᾱ = 1/(1 + σ²) — the
    same latent divided by √(1 + σ²), exactly what a VP scheduler's add_noise gives at σ(t),
    and ε itself at σ = ∞. Computed in float32 (float64 for float64 inputs) and rounded once
    to the inputs' dtype: at a ZTSNR σ_max σ·ε is ~10⁴, and a half-precision intermediate
    would cost the result its last bits. A new tensor, never a view of the inputs."""
    sigma = float(sigma)
    if vp:
        a, b = _vp_coefficients(sigma)
    elif math.isfinite(sigma):
        a, b = 1.0, sigma
    else:
        raise ValueError(f"noised_reference: no σ-space latent at σ = {sigma}")
    dtype = torch.promote_types(z0.dtype, eps.dtype)
    work = torch.promote_types(dtype, torch.float32)
    z0, eps = z0.to(work), eps.to(work)
    if a == 0:
        z = eps * b
    else:
        z = torch.add(z0 if a == 1 else z0 * a, eps, alpha=b)
    return z.to(dtype)
