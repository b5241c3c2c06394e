"""Tests of raeg_pl.metrics.image_quality: 8-bit conversion, per-image metrics, ImageQuality."""

from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio

from raeg_pl.metrics import (
    PSNR_MAX_DB,
    ImageQuality,
    exact_pixel_rate,
    from_uint8,
    l2,
    linf,
    psnr_db,
    ssim,
    to_uint8,
)


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Tiny tensors: one intra-op thread is as fast, and immune to a busy machine's stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def smooth_images(n: int = 4, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, 3, h, w) float in [0, 1]: smooth random fields (low-resolution noise, upsampled)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, h // 4, w // 4, generator=g)
    return torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic").clamp(0, 1)


def gaussian_noise(x: torch.Tensor, std: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=g)).clamp(0, 1)


# ----------------------------------------------------------------------------------------------
# 8-bit conversion
# ----------------------------------------------------------------------------------------------


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([0.0, 0.4 / 255, 0.6 / 255, 254.6 / 255, 1.0, 1.3, -0.2, 100.0 / 255])
    out = to_uint8(x)
    assert out.dtype == torch.uint8
    assert out.tolist() == [0, 0, 1, 255, 255, 255, 0, 100]


def test_uint8_round_trip():
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    f = from_uint8(u)
    assert f.dtype == torch.float32 and f.min() == 0.0 and f.max() == 1.0
    assert torch.equal(to_uint8(f), u)
    assert to_uint8(u) is u
    assert from_uint8(u, torch.float64).dtype == torch.float64
    with pytest.raises(TypeError):
        to_uint8(torch.zeros(2, dtype=torch.int32))


# ----------------------------------------------------------------------------------------------
# PSNR
# ----------------------------------------------------------------------------------------------


def test_psnr_of_known_mse():
    a = torch.full((3, 3, 16, 16), 0.5)
    deltas = torch.tensor([0.1, 0.01, 2.0 / 255])
    signs = (torch.arange(16 * 16).reshape(16, 16) % 2) * 2 - 1  # +-1 checkerboard-ish
    b = a + deltas[:, None, None, None] * signs  # every value off by exactly delta
    expected = 10 * torch.log10(1.0 / deltas.double() ** 2)
    got = psnr_db(a, b)
    assert got.shape == (3,) and got.dtype == torch.float32
    assert torch.allclose(got.double(), expected, atol=1e-3)
    assert got[0] == pytest.approx(20.0, abs=1e-3) and got[1] == pytest.approx(40.0, abs=1e-3)


def test_psnr_mixed_mse_per_image_and_against_torchmetrics():
    x = smooth_images(4)
    y = gaussian_noise(x, 0.03)
    mse = (x - y).pow(2).flatten(1).mean(1).double()
    assert torch.allclose(psnr_db(x, y).double(), 10 * torch.log10(1 / mse), atol=1e-3)
    ref = peak_signal_noise_ratio(y, x, data_range=1.0, reduction="none", dim=(1, 2, 3))
    assert torch.allclose(psnr_db(y, x), ref.float(), atol=1e-3)


def test_psnr_identical_and_cap():
    x = smooth_images(2)
    assert torch.equal(psnr_db(x, x), torch.full((2,), PSNR_MAX_DB))
    assert torch.equal(psnr_db(x, x, max_db=60.0), torch.full((2,), 60.0))
    tiny = x.clone()
    tiny[0, 0, 0, 0] += 1e-7  # MSE ~ 3e-18, PSNR ~ 175 dB -> capped
    out = psnr_db(x, tiny)
    assert out[0] == PSNR_MAX_DB and torch.isfinite(out).all()


def test_psnr_accepts_uint8():
    x = smooth_images(2)
    y = gaussian_noise(x, 0.02)
    assert torch.allclose(
        psnr_db(to_uint8(x), to_uint8(y)), psnr_db(from_uint8(to_uint8(x)), from_uint8(to_uint8(y)))
    )
    with pytest.raises(ValueError, match="shapes differ"):
        psnr_db(x, y[:1])


# ----------------------------------------------------------------------------------------------
# SSIM
# ----------------------------------------------------------------------------------------------


def test_ssim_identical_is_one_and_drops_with_noise():
    x = smooth_images(4)
    same = ssim(x, x)
    assert same.shape == (4,)
    assert torch.allclose(same, torch.ones(4), atol=1e-5)
    values = [ssim(x, gaussian_noise(x, s)) for s in (0.01, 0.03, 0.1, 0.3)]
    for hi, lo in zip(values, values[1:]):
        assert (lo < hi).all()
    assert (values[0] > 0.9).all() and (values[-1] < 0.5).all()


def test_ssim_is_per_image():
    x = smooth_images(3)
    y = x.clone()
    y[1] = gaussian_noise(x[1:2], 0.2)[0]
    out = ssim(x, y)
    assert out[0] == pytest.approx(1.0, abs=1e-5) and out[2] == pytest.approx(1.0, abs=1e-5)
    assert out[1] < 0.8
    assert torch.allclose(ssim(x[1:2], y[1:2]), out[1:2], atol=1e-6)


def test_ssim_small_images():
    x = smooth_images(2, 8, 8)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    assert (ssim(x, gaussian_noise(x, 0.1)) < 0.99).all()


# ----------------------------------------------------------------------------------------------
# Exact pixels and distances
# ----------------------------------------------------------------------------------------------


def test_exact_pixel_rate():
    a = torch.randint(
        0, 256, (2, 3, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    b = a.clone()
    b.view(2, -1)[0, :6] += 1  # 6 of 60 values differ in image 0 (uint8 wrap-around still differs)
    out = exact_pixel_rate(a, b)
    assert out.shape == (2,)
    assert out.tolist() == pytest.approx([54 / 60, 1.0])
    # Float images are stored as 8 bit first: sub-half-level differences do not count.
    fa = from_uint8(a)
    assert exact_pixel_rate(fa, fa + 0.4 / 255).tolist() == [1.0, 1.0]
    assert exact_pixel_rate(fa, from_uint8(b)).tolist() == pytest.approx([0.9, 1.0])
    with pytest.raises(ValueError):
        exact_pixel_rate(a, b[:1])


def test_linf_and_l2_units():
    a = torch.zeros(2, 3, 8, 8)
    b = a.clone()
    b[0, 0, 0, 0] = 8 / 255
    b[0, 1, 2, 3] = 3 / 255
    b[1, :, :2, :2] = 2 / 255  # 12 values off by 2 levels
    assert linf(a, b).tolist() == pytest.approx([8.0, 2.0], abs=1e-4)
    assert linf(a, b, scale=1.0).tolist() == pytest.approx([8 / 255, 2 / 255], abs=1e-7)
    assert l2(a, b).tolist() == pytest.approx([math.sqrt(64 + 9), math.sqrt(12 * 4)], abs=1e-4)
    assert l2(a, b, scale=1.0)[1].item() == pytest.approx(math.sqrt(48) / 255, abs=1e-7)
    assert torch.allclose(linf(to_uint8(a), to_uint8(b)), linf(a, b), atol=1e-4)


# ----------------------------------------------------------------------------------------------
# ImageQuality metric
# ----------------------------------------------------------------------------------------------


def _batches():
    x = smooth_images(8, seed=3)
    y = from_uint8(to_uint8(gaussian_noise(x, 0.02, seed=4)))
    y[2] = from_uint8(to_uint8(x[2]))  # one exactly recovered image (PSNR capped)
    x = from_uint8(to_uint8(x))
    return x, y


def _assert_same(r1: dict, r2: dict):
    assert r1.keys() == r2.keys()
    for k in r1:
        assert torch.allclose(r1[k].double(), r2[k].double(), rtol=1e-6, atol=1e-6), k


def test_image_quality_accumulates_like_one_batch():
    x, y = _batches()
    whole = ImageQuality()
    whole.update(y, x)
    parts = ImageQuality()
    parts.update(y[:3], x[:3])
    parts.update(y[3:], x[3:])
    r_whole, r_parts = whole.compute(), parts.compute()
    _assert_same(r_whole, r_parts)
    assert r_whole["count"].item() == 8
    assert r_whole["psnr"].item() == pytest.approx(psnr_db(y, x).mean().item(), abs=1e-4)
    assert r_whole["ssim"].item() == pytest.approx(ssim(y, x).mean().item(), abs=1e-5)
    assert r_whole["linf"].item() == pytest.approx(linf(y, x).mean().item(), abs=1e-4)
    assert r_whole["linf_max"].item() == pytest.approx(linf(y, x).max().item(), abs=1e-4)
    assert r_whole["l2"].item() == pytest.approx(l2(y, x).mean().item(), abs=1e-3)
    rate = exact_pixel_rate(to_uint8(y), to_uint8(x)).mean().item()  # equal sizes: same mean
    assert r_whole["exact_pixel_rate"].item() == pytest.approx(rate, abs=1e-6)
    assert 0 < rate < 1


def test_image_quality_merges_like_distributed_sync():
    """Merging per-process states with the declared reductions gives the single-process result."""
    x, y = _batches()
    whole = ImageQuality()
    whole.update(y, x)
    rank0, rank1 = ImageQuality(), ImageQuality()
    rank0.update(y[:5], x[:5])
    rank1.update(y[5:], x[5:])
    rank0.merge_state(rank1)
    _assert_same(whole.compute(), rank0.compute())
    assert rank0._reductions  # every state declares a reduction (sum or max)
    assert set(rank0._defaults) == set(rank0._reductions)


def test_image_quality_uint8_input_and_reset():
    x, y = _batches()
    m_float, m_uint8 = ImageQuality(), ImageQuality()
    m_float.update(y, x)
    m_uint8.update(to_uint8(y), to_uint8(x))
    _assert_same(m_float.compute(), m_uint8.compute())
    m_float.reset()
    m_float.update(x, x)
    out = m_float.compute()
    assert out["psnr"].item() == PSNR_MAX_DB and out["exact_pixel_rate"].item() == 1.0
    assert out["linf"].item() == 0.0 and out["ssim"].item() == pytest.approx(1.0, abs=1e-5)


def test_ssim_is_exact_inside_a_bf16_autocast_region():
    import torch

    from raeg_pl.metrics import ssim

    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=g)
    y = (x + 0.002 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ssim(x, y)
    assert torch.allclose(inside, ssim(x, y), atol=1e-6)
    assert inside.min() > 0.99
