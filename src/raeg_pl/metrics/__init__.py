"""Metrics: image quality (PSNR, SSIM, exact-pixel rate, distances), 8-bit conversion and the
class structure of a perturbation."""

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
from raeg_pl.metrics.perturbation import class_mean_energy, class_structure, classmean_share

__all__ = [
    "PSNR_MAX_DB",
    "ImageQuality",
    "class_mean_energy",
    "class_structure",
    "classmean_share",
    "exact_pixel_rate",
    "from_uint8",
    "l2",
    "linf",
    "psnr_db",
    "ssim",
    "to_uint8",
]
