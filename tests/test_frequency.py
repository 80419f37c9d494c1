"""FM (Eq. 4) against a float64 FFT reference with the K(t) box."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fam.frequency import frequency_modulate, highpass_box


def reference(z, z_ref, rho, native_hw, c):
    """Eq. 4 literally: fftshift-ed spectra, K ρ inside the box and 1 outside, float64."""
    H, W = z.shape[-2:]
    h, w = native_hw
    th, tw = h * c * (1 - rho), w * c * (1 - rho)
    K = torch.ones(H, W, dtype=torch.float64)
    for y in range(H):
        for x in range(W):
            if abs(y - H // 2) < th / 2 and abs(x - W // 2) < tw / 2:
                K[y, x] = rho
    shift = lambda t: torch.fft.fftshift(torch.fft.fft2(t.double()), dim=(-2, -1))
    mixed = K * shift(z) + (1 - K) * shift(z_ref)
    return torch.fft.ifft2(torch.fft.ifftshift(mixed, dim=(-2, -1))).real


def test_box_values_and_edges():
    K = highpass_box((16, 16), (8, 8), 0.5, c=0.5)
    # τ = 8 · 0.5 · 0.5 = 2 → |y - 8| < 1 : only the centre
    assert K.dtype == torch.float32 and K.shape == (16, 16)
    assert K[8, 8] == 0.5 and (K == 0.5).sum() == 1
    K = highpass_box((16, 16), (8, 8), 0.0, c=1.0)      # τ = 8: |d| < 4 → 7×7 box
    assert (K == 0.0).sum() == 49 and K[8 - 3, 8 + 3] == 0 and K[8 - 4, 8] == 1
    assert torch.equal(highpass_box((9, 5), (3, 3), 1.0), torch.ones(9, 5))


@settings(max_examples=40, deadline=None)
@given(H=st.integers(3, 40), W=st.integers(3, 40), sh=st.floats(1.0, 4.0),
       sw=st.floats(1.0, 4.0), rho=st.floats(0.0, 1.0), c=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**31 - 1))
def test_matches_float64_reference(H, W, sh, sw, rho, c, seed):
    native = (max(1, int(H / sh)), max(1, int(W / sw)))
    g = torch.Generator().manual_seed(seed)
    z, z_ref = torch.randn(2, 2, 3, H, W, generator=g, dtype=torch.float64)
    out = frequency_modulate(z.float(), z_ref.float(), rho, native, c)
    assert out.shape == z.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference(z, z_ref, rho, native, c),
                               atol=2e-5, rtol=0)


def test_rho_one_is_identity_and_rho_zero_swaps_the_band():
    g = torch.Generator().manual_seed(1)
    z, z_ref = torch.randn(2, 1, 4, 24, 32, generator=g)
    assert torch.equal(frequency_modulate(z, z_ref, 1.0, (12, 16)), z)
    out = frequency_modulate(z, z_ref, 0.0, (12, 16), c=0.5)
    inside = torch.fft.ifftshift(highpass_box((24, 32), (12, 16), 0.0)) == 0
    spec_out, spec_z, spec_ref = (torch.fft.fft2(t.double()) for t in (out, z, z_ref))
    torch.testing.assert_close(spec_out[..., inside], spec_ref[..., inside], atol=1e-4, rtol=0)
    torch.testing.assert_close(spec_out[..., ~inside], spec_z[..., ~inside], atol=1e-4, rtol=0)
    assert inside.sum() > 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_use_float32_fft(dtype):
    g = torch.Generator().manual_seed(2)
    z, z_ref = torch.randn(2, 2, 4, 17, 23, generator=g)
    z, z_ref = z.to(dtype), z_ref.to(dtype)
    out = frequency_modulate(z, z_ref, 0.3, (7, 9))
    assert out.dtype == dtype and out.shape == z.shape
    ref = reference(z.double(), z_ref.double(), 0.3, (7, 9), 0.5)
    tol = 1e-2 if dtype == torch.float16 else 6e-2
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=0)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="same shape"):
        frequency_modulate(torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 9), 0.5, (4, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_matches_reference(dtype):
    g = torch.Generator().manual_seed(3)
    z, z_ref = torch.randn(2, 2, 4, 67, 45, generator=g)
    out = frequency_modulate(z.cuda().to(dtype), z_ref.cuda().to(dtype), 0.4, (30, 20))
    assert out.device.type == "cuda" and out.dtype == dtype
    ref = reference(z.to(dtype).double(), z_ref.to(dtype).double(), 0.4, (30, 20), 0.5)
    tol = 2e-5 if dtype == torch.float32 else 6e-2
    torch.testing.assert_close(out.cpu().double(), ref, atol=tol, rtol=0)
