"""Frequency Modulation (FAM Eq. 4): the low frequencies of the high-res latent come from the
re-noised upsampled native latent, the high frequencies from the sampler's own latent."""

from __future__ import annotations

import torch

__all__ = ["highpass_box", "frequency_modulate"]


def highpass_box(hires_hw, native_hw, rho: float, c: float = 0.5) -> torch.Tensor:
    """K(t) of docs/method.md §2, fftshift-ed layout: ρ inside the centred box of size c·(1-ρ)·(h, w),
    1 elsewhere (strict edges). Float32, shape (H, W)."""
    inside = _box(hires_hw, native_hw, rho, c, torch.device("cpu"))
    return torch.where(inside, torch.tensor(rho, dtype=torch.float32), torch.tensor(1.0))


def _box(hires_hw, native_hw, rho, c, device) -> torch.Tensor:
    """Boolean (H, W) mask of the centred box |y - H//2| < τ_h/2, |x - W//2| < τ_w/2."""
    (H, W), (h, w) = hires_hw, native_hw
    tau_h, tau_w = h * c * (1.0 - rho), w * c * (1.0 - rho)
    y = (torch.arange(H, device=device, dtype=torch.float64) - H // 2).abs()
    x = (torch.arange(W, device=device, dtype=torch.float64) - W // 2).abs()
    return (y[:, None] < tau_h / 2) & (x[None, :] < tau_w / 2)


def _guide_weight(hires_hw, native_hw, rho: float, c: float, device) -> torch.Tensor:
    """1 - K(t) in the un-shifted layout of `rfft2` (last axis halved): the weight of the
    reference spectrum. Real and Hermitian-symmetric, so the real FFT pair is exact."""
    inside = torch.fft.ifftshift(_box(hires_hw, native_hw, rho, c, device))
    weight = inside[:, : hires_hw[1] // 2 + 1].to(torch.float32) * (1.0 - rho)
    return weight


def frequency_modulate(z: torch.Tensor, z_ref: torch.Tensor, rho: float, native_hw,
                       c: float = 0.5) -> torch.Tensor:
    """FAM Eq. 4: IFFT2(K ⊙ FFT2(z) + (1 − K) ⊙ FFT2(z_ref)), in float32 whatever z's dtype.

    Computed as z + IFFT2((1 − K) ⊙ FFT2(z_ref − z)): one real FFT pair, and z itself is
    untouched outside the guided band. Returns z's shape, dtype and device."""
    if z.shape != z_ref.shape:
        raise ValueError(f"frequency_modulate: z {tuple(z.shape)} and z_ref "
                         f"{tuple(z_ref.shape)} must have the same shape")
    hires_hw = tuple(z.shape[-2:])
    if c <= 0 or rho >= 1:      # empty box or zero weight, decided without a device sync
        return z.clone()
    weight = _guide_weight(hires_hw, native_hw, rho, c, z.device)
    zf = z.float()
    spec = torch.fft.rfft2(z_ref.float() - zf) * weight
    out = zf + torch.fft.irfft2(spec, s=hires_hw)
    return out.to(z.dtype)
