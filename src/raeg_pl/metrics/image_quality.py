"""Image-quality metrics: 8-bit conversion, per-image PSNR/SSIM/distances, and a DDP metric.

Conventions:

* Float images are (B, C, H, W) with values in [0, 1]; uint8 images are (B, C, H, W) in
  [0, 255]. Functions that take float images also accept uint8 ones (converted with
  :func:`from_uint8`).
* Per-image functions return a (B,) float tensor (float32 unless stated otherwise).
* Distances (:func:`linf`, :func:`l2`) are in 8-bit units ([0, 255] pixel scale) by default,
  so an L-inf of ``8`` means ``8 / 255``; pass ``scale=1.0`` for [0, 1] units.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric
from torchmetrics.functional.image import structural_similarity_index_measure

# The 8-bit conversions live in one place; re-exported as part of the metrics API.
from raeg_pl.utils.quantize import from_uint8, to_uint8

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

#: PSNR reported for identical images (and the cap for all PSNR values), in dB.
PSNR_MAX_DB: float = 100.0


def _pair(a: torch.Tensor, b: torch.Tensor, fn: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a pair of (B, C, H, W) images and convert them to float32 (uint8 -> [0, 1])."""
    if a.shape != b.shape:
        raise ValueError(f"{fn}: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim != 4:
        raise ValueError(f"{fn}: expected (B, C, H, W) images, got shape {tuple(a.shape)}")
    a = from_uint8(a) if a.dtype == torch.uint8 else a.float()
    b = from_uint8(b) if b.dtype == torch.uint8 else b.float()
    return a.detach(), b.detach()


def psnr_db(
    a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, max_db: float = PSNR_MAX_DB
) -> torch.Tensor:
    """Per-image peak signal-to-noise ratio in dB: ``10 * log10(data_range**2 / MSE)``.

    The MSE is taken over all channels and pixels of each image. Identical images (MSE 0)
    would give +inf; they get ``max_db`` instead, and every value is capped at ``max_db``, so
    the result is always finite and means over images are well defined.

    Args:
        a: (B, C, H, W) float in [0, data_range] (or uint8, converted to [0, 1]).
        b: (B, C, H, W) same shape as ``a``.
        data_range: peak value (1.0 for [0, 1] images).
        max_db: cap, and value for identical images.

    Returns:
        (B,) float32 PSNR in dB, in (-inf, max_db].
    """
    a, b = _pair(a, b, "psnr_db")
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(dim=1)
    psnr = 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-300))
    psnr = torch.where(mse == 0, torch.full_like(psnr, max_db), psnr.clamp(max=max_db))
    return psnr.float()


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 1.0,
    kernel_size: int = 11,
    sigma: float = 1.5,
) -> torch.Tensor:
    """Per-image structural similarity (SSIM, Gaussian window), mean over channels and pixels.

    Computed with ``torchmetrics``' ``structural_similarity_index_measure`` (``reduction='none'``);
    the window shrinks to the image size for images smaller than ``kernel_size``. Borders are
    excluded as in torchmetrics.

    Args:
        a: (B, C, H, W) float in [0, data_range] (or uint8, converted to [0, 1]).
        b: (B, C, H, W) same shape as ``a``.
        data_range: value range of the images.
        kernel_size: odd Gaussian window side.
        sigma: Gaussian window standard deviation in pixels.

    Returns:
        (B,) float32 SSIM in [-1, 1]; 1 for identical images.
    """
    a, b = _pair(a, b, "ssim")
    k = min(kernel_size, *a.shape[-2:])
    k = k if k % 2 == 1 else k - 1
    # SSIM's Gaussian filtering must not run in a bf16/fp16 autocast region (validation
    # under mixed precision): the variance terms lose all precision there.
    with torch.autocast(device_type=a.device.type, enabled=False):
        out = structural_similarity_index_measure(
            a.float(),
            b.float(),
            data_range=data_range,
            kernel_size=k,
            sigma=sigma,
            reduction="none",
        )
    return out.reshape(a.shape[0]).float()


def exact_pixel_rate(a_uint8: torch.Tensor, b_uint8: torch.Tensor) -> torch.Tensor:
    """Per-image share of 8-bit values (over channels and pixels) that are exactly equal.

    Args:
        a_uint8: (B, C, H, W) uint8 (float input in [0, 1] is first stored as 8 bit with
            :func:`to_uint8`).
        b_uint8: (B, C, H, W) same shape.

    Returns:
        (B,) float32 in [0, 1]; 1 means bit-exact.
    """
    if a_uint8.shape != b_uint8.shape or a_uint8.ndim != 4:
        raise ValueError(
            f"exact_pixel_rate: need equal (B, C, H, W) shapes, got "
            f"{tuple(a_uint8.shape)} and {tuple(b_uint8.shape)}"
        )
    eq = to_uint8(a_uint8) == to_uint8(b_uint8)
    return eq.flatten(1).float().mean(dim=1)


def linf(a: torch.Tensor, b: torch.Tensor, scale: float = 255.0) -> torch.Tensor:
    """Per-image L-inf distance ``max |a - b|``, in 8-bit units by default.

    Args:
        a: (B, C, H, W) float in [0, 1] (or uint8, converted to [0, 1]).
        b: (B, C, H, W) same shape.
        scale: multiplier of the [0, 1] difference: 255 for [0, 255] units, 1 for [0, 1].

    Returns:
        (B,) float32 in [0, scale].
    """
    a, b = _pair(a, b, "linf")
    return ((a - b).abs().flatten(1).amax(dim=1) * scale).float()


def l2(a: torch.Tensor, b: torch.Tensor, scale: float = 255.0) -> torch.Tensor:
    """Per-image Euclidean distance ``||a - b||_2`` over all values, in 8-bit units by default.

    This is the norm (not the RMS): it grows with image size. For CIFAR-size images, an
    L2 of 1.0 in [0, 1] units equals 255 here.

    Args:
        a: (B, C, H, W) float in [0, 1] (or uint8, converted to [0, 1]).
        b: (B, C, H, W) same shape.
        scale: multiplier of the [0, 1] difference: 255 for [0, 255] units, 1 for [0, 1].

    Returns:
        (B,) float32, >= 0.
    """
    a, b = _pair(a, b, "l2")
    return ((a.double() - b.double()).flatten(1).norm(dim=1) * scale).float()


class ImageQuality(Metric):
    """Accumulating image-quality metric (fidelity / reversibility), safe under DDP.

    Each :meth:`update` takes a batch of predictions (protected or recovered images) and
    targets (originals). Per-image PSNR, SSIM, L-inf and L2 are summed, as are the counts of
    exactly equal 8-bit values, all in ``sum`` states (``linf_max`` in a ``max`` state), so
    synchronising across processes and :meth:`compute` give the same result as one process
    seeing all images. Evaluate on images after the 8-bit save/reload step.

    :meth:`compute` returns a dict of 0-dim tensors:

    * ``psnr``: mean per-image PSNR in dB (identical images count as ``max_db``),
    * ``ssim``: mean per-image SSIM,
    * ``exact_pixel_rate``: share of all 8-bit values that are equal (pixel-weighted),
    * ``linf``: mean per-image L-inf in 8-bit units; ``linf_max``: the largest one,
    * ``l2``: mean per-image L2 in 8-bit units,
    * ``count``: number of images.

    Args:
        max_db: PSNR cap (see :func:`psnr_db`).
        **kwargs: passed to :class:`torchmetrics.Metric` (``sync_on_compute``, ...).
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    psnr_sum: torch.Tensor
    ssim_sum: torch.Tensor
    linf_sum: torch.Tensor
    l2_sum: torch.Tensor
    linf_max: torch.Tensor
    exact_count: torch.Tensor
    value_count: torch.Tensor
    count: torch.Tensor

    def __init__(self, max_db: float = PSNR_MAX_DB, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_db = float(max_db)
        for name in ("psnr_sum", "ssim_sum", "linf_sum", "l2_sum"):
            self.add_state(
                name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
            )
        self.add_state(
            "linf_max", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="max"
        )
        for name in ("exact_count", "value_count", "count"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch.

        Args:
            preds: (B, C, H, W) float in [0, 1] or uint8 (protected / recovered images).
            target: (B, C, H, W) same shape (original images).
        """
        p, t = _pair(preds, target, "ImageQuality.update")
        self.psnr_sum += psnr_db(p, t, max_db=self.max_db).double().sum()
        self.ssim_sum += ssim(p, t).double().sum()
        li = linf(p, t).double()
        self.linf_sum += li.sum()
        self.linf_max = torch.maximum(self.linf_max, li.max())
        self.l2_sum += l2(p, t).double().sum()
        self.exact_count += (to_uint8(p) == to_uint8(t)).sum()
        self.value_count += p.numel()
        self.count += p.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        """Means over all images seen (NaN when nothing was added)."""
        n = self.count.double()
        nan = torch.tensor(math.nan, dtype=torch.float64, device=n.device)

        def mean(total: torch.Tensor) -> torch.Tensor:
            return (total / n if n > 0 else nan).float()

        return {
            "psnr": mean(self.psnr_sum),
            "ssim": mean(self.ssim_sum),
            "exact_pixel_rate": (
                self.exact_count.double() / self.value_count.double()
                if self.value_count > 0
                else nan
            ).float(),
            "linf": mean(self.linf_sum),
            "linf_max": self.linf_max.float(),
            "l2": mean(self.l2_sum),
            "count": self.count.clone(),
        }
