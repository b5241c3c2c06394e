"""The share of a perturbation's energy that JPEG keeps (the protector's ``l_jpegkeep`` term),
checked against real JPEG: what it scores high survives Pillow's JPEG-10, what it scores low
does not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raeg_pl.defenses.ops import jpeg_kept_share, jpeg_real


def _noise(seed: int, shape=(16, 3, 32, 32)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _smooth(seed: int) -> torch.Tensor:
    """Grey, low-frequency patterns: one random value per 8x8 block, bicubically smoothed."""
    coarse = torch.randn((16, 1, 4, 4), generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=32, mode="bicubic", align_corners=False).expand(16, 3, 32, 32)


def test_share_is_scale_invariant_and_in_range():
    d = _noise(0)
    s = float(jpeg_kept_share(d))
    assert 0 < s < 1
    assert float(jpeg_kept_share(7.5 * d)) == pytest.approx(s, rel=1e-5)
    assert float(jpeg_kept_share(torch.zeros(2, 3, 16, 16))) == 0.0
    # ...with zero, finite gradients (a generator at the identity, before any warm-up);
    # a clamped denominator gave NaN here.
    for channels in (1, 3):
        zero = torch.zeros(2, channels, 16, 16, requires_grad=True)
        jpeg_kept_share(zero).backward()
        assert torch.equal(zero.grad, torch.zeros_like(zero))


def test_smooth_luma_scores_far_above_noise_and_chroma_detail():
    noise = float(jpeg_kept_share(_noise(1)))
    smooth = float(jpeg_kept_share(_smooth(1)))
    # Chroma detail: opposite signs in red and blue at the pixel level, no luma change.
    no_luma = torch.tensor([1.0, -(0.299 + 0.114) / 0.587, 1.0]).view(1, 3, 1, 1)
    chroma = _noise(2, (16, 1, 32, 32)) * no_luma
    chroma_share = float(jpeg_kept_share(chroma))
    assert smooth > 3 * noise and smooth > 0.25
    assert chroma_share < noise
    # One DCT coefficient with the smallest quality-10 step (luma (0, 2)) scores 1.
    n = torch.arange(8, dtype=torch.float64)
    basis = torch.cos((2 * n + 1) * 2 * torch.pi / 16)
    block = basis[None, :].expand(8, 8)  # varies along the width: coefficient (0, 2)
    plane = block.repeat(4, 4)[None, None].expand(1, 3, 32, 32)
    assert float(jpeg_kept_share(plane)) == pytest.approx(1.0, rel=1e-6)


def test_a_higher_share_survives_real_jpeg_10_better():
    """Add each perturbation at the same size to real images, JPEG-10 both: the fraction of
    the perturbation still there (projection of the JPEG difference on it) follows the share."""
    g = torch.Generator().manual_seed(3)
    base = F.interpolate(torch.rand((16, 3, 8, 8), generator=g), size=32, mode="bilinear")
    base = base * 0.6 + 0.2
    survived = {}
    for name, d in (("noise", _noise(4)), ("smooth", _smooth(4))):
        d = d / d.pow(2).mean().sqrt() * (6 / 255)  # RMSE 6 levels, about 32.6 dB
        before = jpeg_real(base, 10)
        after = jpeg_real((base + d).clamp(0, 1), 10)
        kept = ((after - before) * d).sum() / d.pow(2).sum()
        survived[name] = float(kept)
    # Measured: about 0.98 of the smooth pattern and 0.05 of the noise survive.
    assert survived["smooth"] > 0.5 > 0.2 > survived["noise"], survived


@pytest.mark.parametrize("quality", [0, 101])
def test_bad_quality_is_refused(quality):
    with pytest.raises(ValueError):
        jpeg_kept_share(_noise(0), quality)


def test_bad_shape_is_refused():
    with pytest.raises(ValueError, match="jpeg_kept_share"):
        jpeg_kept_share(torch.zeros(2, 2, 8, 8))


def test_gradient_moves_energy_toward_what_jpeg_keeps():
    d = _noise(5)
    start = float(jpeg_kept_share(d))
    for _ in range(20):
        d = d.detach().requires_grad_(True)
        (1 - jpeg_kept_share(d)).backward()
        with torch.no_grad():
            step = d.grad / d.grad.norm() * d.norm()
            d = d - 0.5 * step
    assert float(jpeg_kept_share(d.detach())) > start + 0.1
