"""The σ clock shared by every host: σ ↔ model timestep t for discrete VP schedules, FM's ρ,
and the noising of the reference latent (docs/method.md §1 step 3, §2)."""

from __future__ import annotations

import bisect
import math

import torch

__all__ = ["VPSchedule", "noised_reference"]


class VPSchedule:
    """Discrete VP schedule given by its ᾱ table (T entries): σ_t = √((1 − ᾱ_t)/ᾱ_t).
    Continuous t by linear interpolation in log σ, as k-diffusion's discrete denoisers do.
    The conversions run on Python floats: a call reads no tensor."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten().cpu()
        self.num_train_timesteps = ac.numel()
        self.log_sigmas = (((1 - ac) / ac) ** 0.5).log()
        self._ls: list[float] = self.log_sigmas.tolist()
        if not all(a < b for a, b in zip(self._ls, self._ls[1:])):
            raise ValueError("VPSchedule: σ must increase strictly with t")

    @property
    def sigma_min(self) -> float:
        return math.exp(self._ls[0])

    @property
    def sigma_max(self) -> float:
        return math.exp(self._ls[-1])

    def sigma_to_t(self, sigma: float) -> float:
        ls = self._ls
        x = math.log(max(float(sigma), 1e-12))
        if x <= ls[0]:
            return 0.0
        if x >= ls[-1]:
            return float(self.num_train_timesteps - 1)
        hi = bisect.bisect_left(ls, x)
        lo = hi - 1
        return lo + (x - ls[lo]) / (ls[hi] - ls[lo])

    def t_to_sigma(self, t: float) -> float:
        t = min(max(float(t), 0.0), self.num_train_timesteps - 1.0)
        lo = int(math.floor(t))
        hi = min(lo + 1, self.num_train_timesteps - 1)
        frac = t - lo
        return math.exp((1 - frac) * self._ls[lo] + frac * self._ls[hi])

    def rho(self, sigma: float) -> float:
        """ρ = t / T (docs/method.md §2), with T the number of training timesteps."""
        return self.sigma_to_t(sigma) / self.num_train_timesteps


def noised_reference(z0: torch.Tensor, eps: torch.Tensor, sigma: float,
                     vp: bool = False) -> torch.Tensor:
    """z̃_σ = z̃₀ + σ·ε in σ-space; in VP space (√ᾱ z̃₀ + √(1−ᾱ) ε) the same divided by
    √(1 + σ²), which is exactly what a VP scheduler's add_noise gives at σ(t)."""
    z = torch.add(z0, eps, alpha=float(sigma))
    if vp:
        z.div_(math.sqrt(1.0 + float(sigma) ** 2))
    return z
