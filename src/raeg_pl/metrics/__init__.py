"""Metrics: image quality (PSNR, SSIM, exact-pixel rate, distances) and 8-bit conversion."""

from raeg_pl.metrics.image_quality import (
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

__all__ = [
    "PSNR_MAX_DB",
    "ImageQuality",
    "exact_pixel_rate",
    "from_uint8",
    "l2",
    "linf",
    "psnr_db",
    "ssim",
    "to_uint8",
]
