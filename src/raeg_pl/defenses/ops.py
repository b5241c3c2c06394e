"""Image defence operations: pure tensor functions, each in a differentiable and a real form.

Every function here takes a batch ``x`` of shape ``(B, C, H, W)``, float, values in ``[0, 1]``
and returns a tensor of the same shape, dtype and device, values in ``[0, 1]``.

* ``*_differentiable`` functions are the training-time simulations: they are built from
  differentiable torch/kornia operations, so gradients flow back to ``x`` (hard steps such as
  rounding use a straight-through estimator).
* ``*_real`` functions are the evaluation-time operations a pirate actually runs. They first
  store the input as 8-bit (:func:`quantize_8bit`), apply the operation (the real JPEG codec
  through Pillow, integer rounding, ...) and store the result as 8-bit again, so their output
  lies on the 8-bit grid ``k / 255``. They are not meant to be differentiated.

Random operations (noise, crop, flip, random-quality JPEG) take an optional
``torch.Generator``. Random numbers are drawn on the generator's device (without one, from the
default generator of ``x``'s device) and in the same order in both forms, so the differentiable
and the real form of an operation called with identically seeded generators make the same
random choices.
"""

from __future__ import annotations

import io
import math

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# The 8-bit storage step and straight-through rounding live in one place; re-exported here
# because the defences are built from them.
from raeg_pl.metrics.perturbation import energy_share
from raeg_pl.utils.quantize import quantize_8bit, round_ste, to_uint8

__all__ = [
    "bits_differentiable",
    "bits_real",
    "crop_differentiable",
    "crop_real",
    "draw_jpeg_quality",
    "flip_differentiable",
    "flip_real",
    "gaussian_blur",
    "gaussian_blur_real",
    "gaussian_kernel_size",
    "gaussian_noise",
    "gaussian_noise_real",
    "grayscale_differentiable",
    "grayscale_real",
    "identity",
    "identity_real",
    "jpeg_differentiable",
    "jpeg_kept_share",
    "jpeg_quant_tables",
    "jpeg_random_real",
    "jpeg_real",
    "jpeg_ste",
    "jpeg_ste_random",
    "median_filter",
    "median_filter_real",
    "quantize_8bit",
    "resize_differentiable",
    "resize_real",
    "round_ste",
    "LUMA_WEIGHTS",
]

#: ITU-R BT.601 luma weights (R, G, B), the ones Pillow's ``convert("L")`` uses.
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def _check_image(x: torch.Tensor, fn: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        dtype = x.dtype if isinstance(x, torch.Tensor) else None
        raise ValueError(f"{fn}: expected a float (B, C, H, W) tensor, got {shape} of {dtype}")


def _to_uint8_numpy(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) float in [0, 1] -> (B, H, W, C) uint8 numpy array (:func:`to_uint8`)."""
    return to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()


def _rand(
    shape: tuple[int, ...], x: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device, returned on ``x``'s device (float32)."""
    device = generator.device if generator is not None else x.device
    return torch.rand(shape, generator=generator, device=device).to(x.device)


def _randn(
    shape: tuple[int, ...], x: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """Standard normal numbers drawn on the generator's device, returned on ``x``'s device/dtype."""
    device = generator.device if generator is not None else x.device
    return torch.randn(shape, generator=generator, device=device).to(device=x.device, dtype=x.dtype)


# ----------------------------------------------------------------------------------------------
# Identity
# ----------------------------------------------------------------------------------------------


def identity(x: torch.Tensor) -> torch.Tensor:
    """No defence (differentiable form): returns ``x`` unchanged.

    Args:
        x: (B, C, H, W) float in [0, 1].

    Returns:
        ``x`` itself.
    """
    return x


def identity_real(x: torch.Tensor) -> torch.Tensor:
    """No defence (real form): only the 8-bit storage step.

    Args:
        x: (B, C, H, W) float in [0, 1].

    Returns:
        (B, C, H, W) float in [0, 1] on the 8-bit grid.
    """
    return quantize_8bit(x)


# ----------------------------------------------------------------------------------------------
# JPEG
# ----------------------------------------------------------------------------------------------


def _check_quality(quality: int) -> None:
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")


def jpeg_differentiable(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Differentiable JPEG compression and decompression (kornia's codec simulation).

    Wraps ``kornia.enhance.jpeg_codec_differentiable`` (Reich et al. 2024): YCbCr conversion,
    4:2:0 chroma subsampling, 8x8 DCT, quantisation with the standard IJG tables scaled by
    ``quality`` (polynomial rounding, so gradients flow), and the inverse. The image is padded to
    multiples of 16 (edge replication, bottom/right, as a JPEG encoder does) and cropped back, and
    the output is clamped to [0, 1]. A 1-channel input is coded as gray RGB and averaged back.

    Args:
        x: (B, C, H, W) float in [0, 1], C in {1, 3}.
        quality: JPEG quality in [1, 100] (the libjpeg / Pillow scale).

    Returns:
        (B, C, H, W) float in [0, 1], differentiable w.r.t. ``x``. Not on the 8-bit grid.
    """
    _check_image(x, "jpeg_differentiable")
    _check_quality(quality)
    b, c, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"jpeg_differentiable: needs 1 or 3 channels, got {c}")
    rgb = x.expand(b, 3, h, w) if c == 1 else x
    ph, pw = (-h) % 16, (-w) % 16
    if ph or pw:
        rgb = F.pad(rgb, (0, pw, 0, ph), mode="replicate")
    q = torch.full((1,), float(quality), device=x.device, dtype=x.dtype)
    out = kornia.enhance.jpeg_codec_differentiable(rgb, q)[..., :h, :w]
    if c == 1:
        out = out.mean(dim=1, keepdim=True)
    return out.clamp(0.0, 1.0)


# Standard IJG (JPEG Annex K) quantisation tables, natural (row-major) order.
_QT_LUMA = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)
_QT_CHROMA = (
    (17, 18, 24, 47, 99, 99, 99, 99),
    (18, 21, 26, 66, 99, 99, 99, 99),
    (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99),
) + ((99,) * 8,) * 4


def jpeg_quant_tables(
    quality: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """The luma and chroma quantisation tables libjpeg uses at ``quality`` (baseline, <= 255).

    Args:
        quality: JPEG quality in [1, 100].
        device: device of the returned tensors.
        dtype: dtype of the returned tensors.

    Returns:
        ``(qt_luma, qt_chroma)``, each (8, 8), integer-valued, in [1, 255].
    """
    _check_quality(quality)
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    out = []
    for base in (_QT_LUMA, _QT_CHROMA):
        t = torch.tensor(base, dtype=torch.int64)
        out.append(((t * scale + 50) // 100).clamp(1, 255).to(device=device, dtype=dtype))
    return out[0], out[1]


def _dct_matrix(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Orthonormal 8-point DCT-II matrix ``D`` (coefficients = D @ block @ D.T)."""
    n = torch.arange(8, dtype=torch.float64)
    norm = torch.where(n == 0, math.sqrt(1 / 8), math.sqrt(2 / 8))
    d = norm[:, None] * torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16)
    return d.to(device=device, dtype=dtype)


def _ycbcr(
    r: torch.Tensor, g: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BT.601 full-range ``(Y, Cb, Cr)`` of RGB planes, without the chroma offset of 128."""
    wr, wg, wb = LUMA_WEIGHTS
    return (
        wr * r + wg * g + wb * b,
        -0.168735892 * r - 0.331264108 * g + 0.5 * b,
        0.5 * r - 0.418687589 * g - 0.081312411 * b,
    )


def _block_dct(planes: torch.Tensor, dct: torch.Tensor) -> torch.Tensor:
    """(B, H, W) planes, sides multiples of 8 -> (B, H/8, W/8, 8, 8) DCT coefficients."""
    b, h, w = planes.shape
    blocks = planes.reshape(b, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)
    return dct @ blocks @ dct.T


def _block_idct(coef: torch.Tensor, dct: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_block_dct`: (B, H/8, W/8, 8, 8) coefficients -> (B, H, W) planes."""
    b, bh, bw = coef.shape[:3]
    return (dct.T @ coef @ dct).permute(0, 1, 3, 2, 4).reshape(b, bh * 8, bw * 8)


def jpeg_kept_share(perturbation: torch.Tensor, quality: int = 10) -> torch.Tensor:
    """Share of a perturbation's energy that JPEG at ``quality`` keeps, differentiably.

    JPEG quantises each 8x8 DCT coefficient of the luma plane and of the 2x2-averaged chroma
    planes with a step ``Q`` from the IJG tables; a small change of a coefficient survives in
    expectation but under rounding noise that grows with ``Q``, so what survives JPEG-10 is
    the luma's low frequencies (steps 50-80 levels), not the high ones (255) nor the chroma
    detail that the averaging removes. The share weighs each coefficient's energy by
    ``(Q_min / Q)^2`` (chroma after 2x2 averaging, scaled back to full resolution)::

        S = Q_min^2 (sum (c_Y / Q_Y)^2 + 4 sum (c_C / Q_C)^2) / (sum c_Y^2 + sum c_Cb^2 + sum c_Cr^2)

    over the YCbCr planes (BT.601, without offsets) of the perturbation, with ``c_C`` the
    coefficients of the averaged chroma planes. ``S`` lies in [0, 1]: 1 for energy in the
    luma coefficients with the smallest step only; independent noise scores about 0.1 at
    quality 10. Scale-invariant, so as a loss it moves energy between frequencies and
    colours, not the perturbation's size (which the PSNR target sets).

    Args:
        perturbation: (B, C, H, W) float perturbations (protected minus clean), C in {1, 3};
            any scale. Sides need not be multiples of 8 or 16 (zero padding adds no energy).
        quality: the JPEG quality whose tables weigh the coefficients, in [1, 100].

    Returns:
        Scalar tensor in [0, 1] (0 for a zero perturbation), differentiable.
    """
    _check_quality(quality)
    if perturbation.dim() != 4 or perturbation.shape[1] not in (1, 3):
        raise ValueError(
            f"jpeg_kept_share: needs (B, 1 or 3, H, W) perturbations, got "
            f"{tuple(perturbation.shape)}"
        )
    with torch.autocast(perturbation.device.type, enabled=False):
        d = perturbation.float() if perturbation.dtype != torch.float64 else perturbation
        h, w = d.shape[-2:]
        d = F.pad(d, (0, (-w) % 16, 0, (-h) % 16))
        qt_y, qt_c = jpeg_quant_tables(quality, d.device, d.dtype)
        dct = _dct_matrix(d.device, d.dtype)

        def weighted(plane: torch.Tensor, qt: torch.Tensor) -> torch.Tensor:
            return (_block_dct(plane, dct) / qt).pow(2).sum()

        if d.shape[1] == 1:
            y, total = d[:, 0], d.pow(2).sum()
            kept = weighted(y, qt_y)
        else:
            y, cb, cr = _ycbcr(d[:, 0], d[:, 1], d[:, 2])
            total = y.pow(2).sum() + cb.pow(2).sum() + cr.pow(2).sum()
            pooled = F.avg_pool2d(torch.stack((cb, cr), 1), 2).flatten(0, 1)
            pooled = F.pad(pooled, (0, (-pooled.shape[-1]) % 8, 0, (-pooled.shape[-2]) % 8))
            kept = weighted(y, qt_y) + 4 * weighted(pooled, qt_c)
        q_min = torch.minimum(qt_y.min(), qt_c.min())
        return energy_share(kept * q_min**2, total)


def _code_plane(plane: torch.Tensor, qt: torch.Tensor, dct: torch.Tensor) -> torch.Tensor:
    """Level shift, 8x8 DCT, quantise (straight-through), dequantise, IDCT, round and clamp."""
    coef = _block_dct(plane - 128.0, dct)
    coef = round_ste(coef / qt) * qt
    out = _block_idct(coef, dct) + 128.0
    return round_ste(out).clamp(0.0, 255.0)


def jpeg_ste(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Differentiable JPEG whose forward pass follows libjpeg; straight-through gradients.

    A re-implementation of baseline JPEG as Pillow/libjpeg does it: 8-bit (rounded) BT.601
    YCbCr, 4:2:0 chroma by 2x2 averaging, level shift by 128, orthonormal 8x8 DCT, quantisation
    with the IJG tables at ``quality``, then decoding with rounding and clamping of the planes,
    triangle ("fancy") chroma upsampling and YCbCr -> RGB. Every rounding is a straight-through
    rounding (:func:`round_ste`): the forward value is exact, the gradient is that of the
    remaining linear operations (colour transform, chroma averaging and upsampling). The
    remaining difference to :func:`jpeg_real` comes from libjpeg's fixed-point DCT and
    rounding details. Padded to multiples of 16 by edge replication (as libjpeg does).

    Args:
        x: (B, C, H, W) float in [0, 1], C in {1, 3}.
        quality: JPEG quality in [1, 100].

    Returns:
        (B, C, H, W) float in [0, 1] on the 8-bit grid (forward), differentiable w.r.t. ``x``.
    """
    _check_image(x, "jpeg_ste")
    b, c, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"jpeg_ste: needs 1 or 3 channels, got {c}")
    rgb = (x.expand(b, 3, h, w) if c == 1 else x).clamp(0.0, 1.0) * 255.0
    ph, pw = (-h) % 16, (-w) % 16
    if ph or pw:
        rgb = F.pad(rgb, (0, pw, 0, ph), mode="replicate")
    y, cb, cr = _ycbcr(rgb[:, 0], rgb[:, 1], rgb[:, 2])
    y, cb, cr = round_ste(y), round_ste(cb + 128.0), round_ste(cr + 128.0)
    cbcr = round_ste(F.avg_pool2d(torch.stack((cb, cr), dim=1), 2))
    qt_y, qt_c = jpeg_quant_tables(quality, x.device, rgb.dtype)
    dct = _dct_matrix(x.device, rgb.dtype)
    y = _code_plane(y, qt_y, dct)
    cbcr = _code_plane(cbcr.flatten(0, 1), qt_c, dct).unflatten(0, (b, 2))
    cbcr = F.interpolate(cbcr, scale_factor=2.0, mode="bilinear", align_corners=False)
    cb, cr = round_ste(cbcr[:, 0]) - 128.0, round_ste(cbcr[:, 1]) - 128.0
    out = torch.stack(
        (y + 1.402 * cr, y - 0.344136286 * cb - 0.714136286 * cr, y + 1.772 * cb), dim=1
    )
    out = round_ste(out).clamp(0.0, 255.0)[..., :h, :w] / 255.0
    return out[:, :1] if c == 1 else out


def jpeg_real(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Real JPEG: 8-bit image saved as a JPEG file with Pillow at ``quality`` and decoded again.

    Pillow's defaults otherwise (libjpeg(-turbo), 4:2:0 chroma subsampling for RGB, standard
    tables, baseline), i.e. exactly ``Image.save(f, "JPEG", quality=quality)`` then
    ``Image.open(f)``. Runs on the CPU, one image at a time.

    Args:
        x: (B, C, H, W) float in [0, 1], C in {1, 3} (1 channel is coded as a grayscale JPEG).
        quality: JPEG quality in [1, 100].

    Returns:
        (B, C, H, W) float in [0, 1] on the 8-bit grid, on ``x``'s device and dtype.
    """
    _check_image(x, "jpeg_real")
    _check_quality(quality)
    c = x.shape[1]
    if c not in (1, 3):
        raise ValueError(f"jpeg_real: needs 1 or 3 channels, got {c}")
    arr = _to_uint8_numpy(x)
    out = np.empty_like(arr)
    for i in range(arr.shape[0]):
        img = Image.fromarray(arr[i, :, :, 0] if c == 1 else arr[i], mode="L" if c == 1 else "RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        dec = np.asarray(Image.open(buf).convert("L" if c == 1 else "RGB"))
        out[i] = dec[..., None] if c == 1 else dec
    t = torch.from_numpy(out).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype)
    return t / 255.0


def draw_jpeg_quality(
    qmin: int, qmax: int, generator: torch.Generator | None = None, device=None
) -> int:
    """A JPEG quality drawn uniformly from the integers ``qmin..qmax`` (both included).

    Args:
        qmin: lowest quality, in [1, 100].
        qmax: highest quality, in [qmin, 100].
        generator: optional RNG; the number is drawn on its device.
        device: device of the draw without a generator (default: the CPU).

    Returns:
        The quality, a Python int.
    """
    _check_quality(qmin)
    _check_quality(qmax)
    if qmin > qmax:
        raise ValueError(f"JPEG quality range needs qmin <= qmax, got {qmin} > {qmax}")
    where = generator.device if generator is not None else (device or "cpu")
    return int(torch.randint(qmin, qmax + 1, (1,), generator=generator, device=where))


def jpeg_ste_random(
    x: torch.Tensor, qmin: int, qmax: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """:func:`jpeg_ste` at a quality drawn per call (one quality for the whole batch).

    Args:
        x: (B, C, H, W) float in [0, 1], C in {1, 3}.
        qmin: lowest quality, in [1, 100].
        qmax: highest quality, in [qmin, 100].
        generator: optional RNG of the draw (:func:`draw_jpeg_quality`).

    Returns:
        (B, C, H, W) float in [0, 1] on the 8-bit grid, differentiable w.r.t. ``x``.
    """
    return jpeg_ste(x, draw_jpeg_quality(qmin, qmax, generator, x.device))


def jpeg_random_real(
    x: torch.Tensor, qmin: int, qmax: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """:func:`jpeg_real` at a quality drawn per call; the same draw as :func:`jpeg_ste_random`.

    Args:
        x: (B, C, H, W) float in [0, 1], C in {1, 3}.
        qmin: lowest quality, in [1, 100].
        qmax: highest quality, in [qmin, 100].
        generator: optional RNG of the draw.

    Returns:
        (B, C, H, W) float in [0, 1] on the 8-bit grid.
    """
    return jpeg_real(x, draw_jpeg_quality(qmin, qmax, generator, x.device))


# ----------------------------------------------------------------------------------------------
# Grayscale
# ----------------------------------------------------------------------------------------------


def _luma(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    if x.shape[1] != 3:
        raise ValueError(f"grayscale: needs 1 or 3 channels, got {x.shape[1]}")
    wr, wg, wb = LUMA_WEIGHTS
    return wr * x[:, 0:1] + wg * x[:, 1:2] + wb * x[:, 2:3]


def grayscale_differentiable(x: torch.Tensor) -> torch.Tensor:
    """Grayscale (differentiable form): BT.601 luma, replicated to every channel.

    Args:
        x: (B, C, H, W) float in [0, 1], C in {1, 3}.

    Returns:
        (B, C, H, W) float in [0, 1] with all channels equal to ``0.299 R + 0.587 G + 0.114 B``.
    """
    _check_image(x, "grayscale_differentiable")
    return _luma(x).expand_as(x).contiguous()


def grayscale_real(x: torch.Tensor) -> torch.Tensor:
    """Grayscale (real form): luma of the 8-bit image, rounded to 8 bit, replicated.

    Matches Pillow's ``convert("L")`` (same weights; Pillow's fixed-point arithmetic can differ
    by one level on rare ties).

    Args:
        x: (B, C, H, W) float in [0, 1], C in {1, 3}.

    Returns:
        (B, C, H, W) float in [0, 1] on the 8-bit grid, all channels equal.
    """
    _check_image(x, "grayscale_real")
    return quantize_8bit(_luma(quantize_8bit(x))).expand_as(x).contiguous()


# ----------------------------------------------------------------------------------------------
# Median filter
# ----------------------------------------------------------------------------------------------


def _check_odd(k: int, what: str) -> None:
    if k < 1 or k % 2 == 0:
        raise ValueError(f"{what} must be a positive odd integer, got {k}")


def median_filter(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Median filter over ``kernel_size x kernel_size`` windows, reflect border (kornia).

    Differentiable in the sense that matters: the gradient goes to the pixel selected as median.

    Args:
        x: (B, C, H, W) float in [0, 1].
        kernel_size: odd window side (1 is the identity).

    Returns:
        (B, C, H, W) float in [0, 1].
    """
    _check_image(x, "median_filter")
    _check_odd(kernel_size, "median kernel_size")
    if kernel_size == 1:
        return x
    # kornia's selection network is much slower on non-contiguous (e.g. channels-last) input.
    return kornia.filters.median_blur(
        x.contiguous(), (kernel_size, kernel_size), border_type="reflect"
    )


def median_filter_real(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Median filter on the 8-bit image (real form); the median of 8-bit values is 8-bit.

    Args:
        x: (B, C, H, W) float in [0, 1].
        kernel_size: odd window side.

    Returns:
        (B, C, H, W) float in [0, 1] on the 8-bit grid.
    """
    with torch.no_grad():
        return quantize_8bit(median_filter(quantize_8bit(x), kernel_size))


# ----------------------------------------------------------------------------------------------
# Gaussian blur
# ----------------------------------------------------------------------------------------------


def gaussian_kernel_size(sigma: float) -> int:
    """Odd Gaussian kernel side covering +-3 sigma: ``2 * ceil(3 * sigma) + 1`` (at least 3)."""
    return max(3, 2 * math.ceil(3.0 * sigma) + 1)


def gaussian_blur(x: torch.Tensor, sigma: float, kernel_size: int = 0) -> torch.Tensor:
    """Gaussian blur with standard deviation ``sigma`` pixels, reflect border (kornia).

    Args:
        x: (B, C, H, W) float in [0, 1].
        sigma: standard deviation in pixels, > 0.
        kernel_size: odd kernel side; 0 picks :func:`gaussian_kernel_size`. It is capped so the
            reflect padding fits in the image.

    Returns:
        (B, C, H, W) float in [0, 1], differentiable w.r.t. ``x``.
    """
    _check_image(x, "gaussian_blur")
    if not sigma > 0:
        raise ValueError(f"blur sigma must be > 0, got {sigma}")
    k = kernel_size or gaussian_kernel_size(sigma)
    _check_odd(k, "blur kernel_size")
    # Reflect padding needs pad < dim: cap the kernel at the largest odd size that fits.
    limit = 2 * (min(x.shape[-2:]) - 1) + 1
    k = min(k, limit if limit % 2 == 1 else limit - 1)
    if k <= 1:
        return x
    return kornia.filters.gaussian_blur2d(x, (k, k), (sigma, sigma), border_type="reflect")


def gaussian_blur_real(x: torch.Tensor, sigma: float, kernel_size: int = 0) -> torch.Tensor:
    """Gaussian blur of the 8-bit image, stored as 8-bit (real form).

    Args:
        x: (B, C, H, W) float in [0, 1].
        sigma: standard deviation in pixels, > 0.
        kernel_size: odd kernel side or 0 for automatic.

    Returns:
        (B, C, H, W) float in [0, 1] on the 8-bit grid.
    """
    with torch.no_grad():
        return quantize_8bit(gaussian_blur(quantize_8bit(x), sigma, kernel_size))


# ----------------------------------------------------------------------------------------------
# Gaussian noise
# ----------------------------------------------------------------------------------------------


def gaussian_noise(
    x: torch.Tensor, std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Additive Gaussian noise (differentiable form), clamped to [0, 1].

    Args:
        x: (B, C, H, W) float in [0, 1].
        std: noise standard deviation in [0, 1] units (``4 / 255`` is four 8-bit levels).
        generator: optional RNG for reproducibility; numbers are drawn on its device.

    Returns:
        (B, C, H, W) float in [0, 1]; the gradient w.r.t. ``x`` is 1 where not clamped.
    """
    _check_image(x, "gaussian_noise")
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    return (x + std * _randn(tuple(x.shape), x, generator)).clamp(0.0, 1.0)


def gaussian_noise_real(
    x: torch.Tensor, std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Additive Gaussian noise on the 8-bit image, clamped and stored as 8-bit (real form).

    Draws the same numbers as :func:`gaussian_noise` for an identically seeded generator.

    Args:
        x: (B, C, H, W) float in [0, 1].
        std: noise standard deviation in [0, 1] units.
        generator: optional RNG for reproducibility.

    Returns:
        (B, C, H, W) float in [0, 1] on the 8-bit grid.
    """
    with torch.no_grad():
        return quantize_8bit(gaussian_noise(quantize_8bit(x), std, generator))


# ----------------------------------------------------------------------------------------------
# Bit-depth reduction
# ----------------------------------------------------------------------------------------------


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bit depth must be in [1, 8], got {bits}")


def bits_differentiable(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-depth reduction (feature squeezing), straight-through rounding.

    ``round(x * (2**bits - 1)) / (2**bits - 1)`` in the forward pass; identity gradient.

    Args:
        x: (B, C, H, W) float in [0, 1].
        bits: bits per channel, in [1, 8].

    Returns:
        (B, C, H, W) float in [0, 1] with ``2**bits`` levels.
    """
    _check_image(x, "bits_differentiable")
    _check_bits(bits)
    levels = float(2**bits - 1)
    return round_ste(x.clamp(0.0, 1.0) * levels) / levels


def bits_real(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-depth reduction of the 8-bit image, stored as 8-bit (real form).

    Args:
        x: (B, C, H, W) float in [0, 1].
        bits: bits per channel, in [1, 8].

    Returns:
        (B, C, H, W) float in [0, 1] on the 8-bit grid (exactly ``2**bits`` levels when
        ``2**bits - 1`` divides 255, i.e. bits in {1, 2, 4, 8}; the nearest 8-bit levels otherwise).
    """
    with torch.no_grad():
        return quantize_8bit(bits_differentiable(quantize_8bit(x), bits))


# ----------------------------------------------------------------------------------------------
# Resize down and up
# ----------------------------------------------------------------------------------------------


def _small_size(h: int, w: int, factor: float) -> tuple[int, int]:
    if not 0 < factor <= 1:
        raise ValueError(f"resize factor must be in (0, 1], got {factor}")
    return max(1, round(h * factor)), max(1, round(w * factor))


def resize_differentiable(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Down-scale by ``factor`` (bilinear, antialiased) and up-scale back (bilinear).

    Args:
        x: (B, C, H, W) float in [0, 1].
        factor: scale in (0, 1]; the small image is ``round(H * factor) x round(W * factor)``.

    Returns:
        (B, C, H, W) float in [0, 1], differentiable w.r.t. ``x``.
    """
    _check_image(x, "resize_differentiable")
    h, w = x.shape[-2:]
    size = _small_size(h, w, factor)
    if size == (h, w):
        return x
    small = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    big = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    return big.clamp(0.0, 1.0)


def resize_real(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Down/up resize of the 8-bit image, the small and the final image both stored as 8-bit.

    Args:
        x: (B, C, H, W) float in [0, 1].
        factor: scale in (0, 1].

    Returns:
        (B, C, H, W) float in [0, 1] on the 8-bit grid.
    """
    _check_image(x, "resize_real")
    with torch.no_grad():
        h, w = x.shape[-2:]
        size = _small_size(h, w, factor)
        x8 = quantize_8bit(x)
        if size == (h, w):
            return x8
        small = quantize_8bit(
            F.interpolate(x8, size=size, mode="bilinear", align_corners=False, antialias=True)
        )
        return quantize_8bit(
            F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
        )


# ----------------------------------------------------------------------------------------------
# Random crop (resized or padded) and flip
# ----------------------------------------------------------------------------------------------


def _crop_params(
    x: torch.Tensor, scale: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image side fraction s and centre offsets (cx, cy) in normalised [-1, 1] coordinates."""
    u = _rand((x.shape[0], 3), x, generator)
    area = scale + (1.0 - scale) * u[:, 0]  # kept area fraction in [scale, 1]
    side = area.sqrt()
    cx = (1.0 - side) * (2.0 * u[:, 1] - 1.0)
    cy = (1.0 - side) * (2.0 * u[:, 2] - 1.0)
    return side, cx, cy


def _pad_shifts(
    x: torch.Tensor, pad: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if pad < 0:
        raise ValueError(f"crop pad must be >= 0, got {pad}")
    u = _rand((x.shape[0], 2), x, generator)
    d = (u * (2 * pad + 1)).floor().clamp(max=2 * pad).long()
    return d[:, 0], d[:, 1]


def _pad_crop(x: torch.Tensor, pad: int, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    b, _, h, w = x.shape
    mode = "reflect" if pad < min(h, w) else "replicate"
    padded = F.pad(x, (pad,) * 4, mode=mode)
    rows = dy[:, None] + torch.arange(h, device=x.device)[None, :]  # (B, H)
    cols = dx[:, None] + torch.arange(w, device=x.device)[None, :]  # (B, W)
    idx_b = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_b, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def _resized_crop(
    x: torch.Tensor, side: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor
) -> torch.Tensor:
    b = x.shape[0]
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = side.to(x.dtype)
    theta[:, 1, 1] = side.to(x.dtype)
    theta[:, 0, 2] = cx.to(x.dtype)
    theta[:, 1, 2] = cy.to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.clamp(0.0, 1.0)


def crop_differentiable(
    x: torch.Tensor, scale: float = 0.8, pad: int = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop: optional pad-and-crop shift, then a random square-ish resized crop.

    1. If ``pad > 0``: reflect-pad by ``pad`` pixels and cut a random ``H x W`` window (an
       integer shift per image, the standard CIFAR augmentation).
    2. If ``scale < 1``: keep a random window of area fraction ``a ~ U[scale, 1]`` (same aspect
       ratio as the image, random position) and resize it back to ``H x W`` (bilinear).

    Random draws, in order: the two shifts (if ``pad > 0``), then three uniforms per image (if
    ``scale < 1``).

    Args:
        x: (B, C, H, W) float in [0, 1].
        scale: smallest kept area fraction, in (0, 1]; 1 disables the resized crop.
        pad: padding for the shift crop, >= 0; 0 disables it.
        generator: optional RNG for reproducibility.

    Returns:
        (B, C, H, W) float in [0, 1], differentiable w.r.t. ``x``.
    """
    _check_image(x, "crop_differentiable")
    if not 0 < scale <= 1:
        raise ValueError(f"crop scale must be in (0, 1], got {scale}")
    out = x
    if pad > 0:
        dx, dy = _pad_shifts(x, pad, generator)
        out = _pad_crop(out, pad, dx, dy)
    if scale < 1:
        side, cx, cy = _crop_params(x, scale, generator)
        out = _resized_crop(out, side, cx, cy)
    return out


def crop_real(
    x: torch.Tensor, scale: float = 0.8, pad: int = 0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop of the 8-bit image, stored as 8-bit (real form of :func:`crop_differentiable`).

    Args:
        x: (B, C, H, W) float in [0, 1].
        scale: smallest kept area fraction, in (0, 1].
        pad: padding for the shift crop, >= 0.
        generator: optional RNG; same draws as :func:`crop_differentiable`.

    Returns:
        (B, C, H, W) float in [0, 1] on the 8-bit grid.
    """
    with torch.no_grad():
        return quantize_8bit(crop_differentiable(quantize_8bit(x), scale, pad, generator))


def flip_differentiable(
    x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random horizontal flip of each image with probability ``p``.

    Args:
        x: (B, C, H, W) float in [0, 1].
        p: flip probability in [0, 1] (1 flips every image). One uniform per image is drawn.
        generator: optional RNG for reproducibility.

    Returns:
        (B, C, H, W) float in [0, 1], differentiable (a permutation of ``x``'s pixels).
    """
    _check_image(x, "flip_differentiable")
    if not 0 <= p <= 1:
        raise ValueError(f"flip probability must be in [0, 1], got {p}")
    mask = _rand((x.shape[0],), x, generator) < p
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def flip_real(
    x: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random horizontal flip of the 8-bit image (real form of :func:`flip_differentiable`).

    Args:
        x: (B, C, H, W) float in [0, 1].
        p: flip probability in [0, 1].
        generator: optional RNG; same draws as :func:`flip_differentiable`.

    Returns:
        (B, C, H, W) float in [0, 1] on the 8-bit grid.
    """
    with torch.no_grad():
        return flip_differentiable(quantize_8bit(x), p, generator)
