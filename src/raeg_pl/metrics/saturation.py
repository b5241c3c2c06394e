"""Where a recovery's error sits: on the original's saturated pixels or on the rest.

A protector's output is clipped to [0, 1] by 8-bit storage. Where the original is already
at 0 or 255 (black backgrounds, blown highlights) whatever the protector adds beyond the
range is lost, and the inverse cannot recover it: the recovery's error then concentrates on
those pixels, and being tied to the image content it can be class-consistent.
"""

from __future__ import annotations

import torch

from raeg_pl.metrics.image_quality import psnr_db

__all__ = ["saturation_error"]


def saturation_error(clean_u8: torch.Tensor, recovered_u8: torch.Tensor) -> dict[str, float]:
    """Mean absolute recovery error, in 8-bit levels, on saturated and unsaturated pixels.

    Args:
        clean_u8: (N, C, H, W) uint8 originals.
        recovered_u8: (N, C, H, W) uint8 images recovered from the stored protected files.

    Returns:
        ``psnr_recovered`` (mean per-image dB, :func:`~raeg_pl.metrics.psnr_db`),
        ``mae_saturated`` (levels, over pixels whose original is 0 or 255),
        ``mae_unsaturated`` (levels, over the others), ``saturated_fraction`` (share of
        saturated pixels) and ``mae_all``. A mean over an empty set is NaN.

    Raises:
        ValueError: not two uint8 (N, C, H, W) tensors of one shape.
    """
    if clean_u8.dtype != torch.uint8 or recovered_u8.dtype != torch.uint8:
        raise ValueError(
            f"saturation_error: expected uint8 images, got {clean_u8.dtype} and {recovered_u8.dtype}"
        )
    if clean_u8.shape != recovered_u8.shape or clean_u8.ndim != 4:
        raise ValueError(
            "saturation_error: expected two (N, C, H, W) tensors of one shape, got "
            f"{tuple(clean_u8.shape)} and {tuple(recovered_u8.shape)}"
        )
    err = (recovered_u8.float() - clean_u8.float()).abs()
    saturated = (clean_u8 == 0) | (clean_u8 == 255)

    def mean(mask: torch.Tensor) -> float:
        n = int(mask.sum())
        return float(err[mask].sum() / n) if n else float("nan")

    return {
        "psnr_recovered": float(psnr_db(recovered_u8, clean_u8).mean()),
        "mae_saturated": mean(saturated),
        "mae_unsaturated": mean(~saturated),
        "mae_all": float(err.mean()),
        "saturated_fraction": float(saturated.float().mean()),
    }
