"""Control protections: random class-wise noise, random sample-wise noise, one-pixel shortcut.

Controls tell a reader what part of a protection's effect any perturbation of the same size
would have. The two random-noise controls add a seeded random pattern whose one scale is
calibrated so that the stored 8-bit images reach a target PSNR (mean over images of the
per-image PSNR, :func:`raeg_pl.metrics.psnr_db`, as the export measures it), so they sit at
the same distortion as the method they control for:

* :class:`ClasswiseNoiseMethod`: one pattern per class, the same for every image of it;
* :class:`SamplewiseNoiseMethod`: an independent pattern per image.

:class:`OnePixelShortcutMethod` is the one-pixel shortcut (Wu et al., ICLR 2023), a
shortcut control with no distortion budget: one pixel per class set to a fixed colour.

None is reversible: the stored images do not hold what the perturbation replaced.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raeg_pl.methods.base import ProtectionMethod, batches
from raeg_pl.methods.pgd import check_images_labels
from raeg_pl.metrics import psnr_db
from raeg_pl.utils.quantize import from_uint8, to_uint8

__all__ = [
    "PATTERNS",
    "PSNR_RANGE_DB",
    "ClasswiseNoiseMethod",
    "OnePixelShortcutMethod",
    "SamplewiseNoiseMethod",
    "add_noise",
    "calibrate_noise_scale",
    "random_pattern",
]

#: Pattern distributions of the random-noise controls.
PATTERNS = ("uniform", "lowfreq")
#: Target PSNRs the random-noise controls accept, in dB: below 15 dB the images are mostly
#: noise; above 60 dB 8-bit rounding leaves almost every value unchanged.
PSNR_RANGE_DB = (15.0, 60.0)
#: The calibration stops once the mean PSNR is this close to the target, in dB.
CALIBRATION_TOL_DB = 0.01
#: The calibration fails when no scale lands within this of the target, in dB.
MAX_ERROR_DB = 0.1

# Seed-sequence streams: the per-class patterns, the per-image patterns of the fitted images,
# and the per-image patterns of any other images (a test split gets patterns of its own).
STREAM_CLASS, STREAM_FITTED, STREAM_UNSEEN = 0, 1, 2


def random_pattern(
    seed: int,
    stream: int,
    index: int,
    shape: tuple[int, int, int],
    pattern: str = "uniform",
    grid: int = 8,
) -> torch.Tensor:
    """A reproducible random pattern, a function of ``(seed, stream, index)`` only.

    Drawn from NumPy's PCG64 seeded by ``SeedSequence([seed, stream, index])``, so each
    pattern is independent of the others and of how images are batched.

    Args:
        seed: the method's seed (any int; taken modulo 2**64).
        stream: which family of patterns (class, fitted image, unseen image), >= 0.
        index: class index or image index, >= 0.
        shape: ``(C, H, W)``.
        pattern: ``"uniform"``: i.i.d. uniform in [-1, 1] per value; ``"lowfreq"``: uniform
            in [-1, 1] on a coarse ``grid x grid`` grid per channel (at most H x W),
            upsampled bilinearly to H x W (smooth, low-frequency noise).
        grid: side of the coarse grid of ``"lowfreq"``, >= 1.

    Returns:
        (C, H, W) float64 in [-1, 1].
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed % 2**64, stream, index]))
    c, h, w = shape
    if pattern == "uniform":
        return torch.from_numpy(rng.uniform(-1.0, 1.0, size=(c, h, w)))
    if pattern == "lowfreq":
        coarse = torch.from_numpy(rng.uniform(-1.0, 1.0, size=(1, c, min(grid, h), min(grid, w))))
        return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
    raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")


def add_noise(images: torch.Tensor, patterns: torch.Tensor, scale: float) -> torch.Tensor:
    """Images with ``scale * patterns`` 8-bit levels added, stored as 8 bits.

    Args:
        images: (B, C, H, W) uint8.
        patterns: (B, C, H, W) float in [-1, 1].
        scale: noise amplitude in 8-bit levels, >= 0.

    Returns:
        (B, C, H, W) uint8: ``round(clamp(images + scale * patterns, 0, 255))``. The sum is
        taken in float64, so where nothing is clipped every image gets exactly
        ``round(scale * pattern)`` added.
    """
    x = from_uint8(images, dtype=torch.float64)
    return to_uint8(x + patterns.to(torch.float64) * (scale / 255.0))


def mean_psnr(
    images: torch.Tensor,
    patterns_of: Callable[[slice], torch.Tensor],
    scale: float,
    batch_size: int,
) -> float:
    """Mean over images of the per-image PSNR (dB) of :func:`add_noise`'s stored output."""
    # One reduction over all images, so the result does not depend on the batching.
    psnr = torch.cat(
        [
            psnr_db(add_noise(images[sl], patterns_of(sl), scale), images[sl])
            for sl in batches(len(images), batch_size)
        ]
    )
    return float(psnr.double().mean())


def calibrate_noise_scale(
    images: torch.Tensor,
    patterns_of: Callable[[slice], torch.Tensor],
    target_db: float,
    batch_size: int = 256,
    tol_db: float = CALIBRATION_TOL_DB,
    max_error_db: float = MAX_ERROR_DB,
) -> tuple[float, float]:
    """The one noise scale at which the stored images reach ``target_db``, by bisection.

    Every image's PSNR falls as the scale grows (rounding and clipping never shrink a
    change), so the mean PSNR does too, and bisection on the scale finds the target.
    Clipping at 0 and 255 lowers the effective distortion of saturated images, which is why
    the scale is measured on the images themselves rather than derived from a formula.
    The bracket starts from the unclipped estimate and widens geometrically; bisection runs
    on log(scale).

    Args:
        images: (N, C, H, W) uint8, N >= 1, the images that will be protected.
        patterns_of: the (B, C, H, W) float patterns in [-1, 1] of ``images[sl]``.
        target_db: the mean per-image PSNR to reach, in dB.
        batch_size: images per evaluation batch.
        tol_db: stop once the mean PSNR is within this of the target.
        max_error_db: fail unless some scale lands within this of the target.

    Returns:
        ``(scale, psnr)``: the scale in 8-bit levels and the mean PSNR it gives.

    Raises:
        ValueError: the target cannot be reached within ``max_error_db`` on these images
            (e.g. images that saturate whatever the noise, or too few values for 8-bit
            rounding to move the PSNR in fine enough steps).
    """

    def measure(scale: float) -> float:
        if scale not in seen:
            seen[scale] = mean_psnr(images, patterns_of, scale, batch_size)
            tried.append((abs(seen[scale] - target_db), scale, seen[scale]))
        return seen[scale]

    seen: dict[float, float] = {}
    tried: list[tuple[float, float, float]] = []
    # Unclipped estimate: MSE = scale^2 * E[p^2] (levels^2), from the first (at most) 64
    # patterns whatever the batch size, so the bisection path does not depend on it.
    first = patterns_of(slice(0, min(len(images), 64))).to(torch.float64)
    rms = float(first.pow(2).mean().sqrt()) or 1.0
    guess = 255.0 * 10.0 ** (-target_db / 20.0) / rms
    lo, hi = guess, guess
    while measure(lo) < target_db and lo > 1e-3:
        lo /= 1.5
    if measure(lo) < target_db:
        raise ValueError(f"psnr: {target_db} dB is above what any noise scale reaches here")
    while measure(hi) > target_db + tol_db:
        if hi > 4 * 255.0 / rms:
            raise ValueError(
                f"psnr: {target_db} dB cannot be reached: with any noise scale these images "
                f"stay above {measure(hi):.2f} dB (they saturate)"
            )
        lo, hi = hi, hi * 1.5
    for _ in range(60):
        if min(tried)[0] <= tol_db:
            break
        mid = math.sqrt(lo * hi)
        psnr = measure(mid)
        if psnr > target_db:
            lo = mid
        else:
            hi = mid
    error, scale, psnr = min(tried)
    if error > max_error_db:
        raise ValueError(
            f"psnr: no noise scale gives {target_db} dB within {max_error_db} dB on these "
            f"{len(images)} images (closest: {psnr:.3f} dB at scale {scale:.4f}); 8-bit "
            "rounding moves the PSNR in steps too coarse for so few values"
        )
    return scale, psnr


def images_fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """A digest of the shape and bytes of ``images`` and ``labels`` (order-sensitive)."""
    h = hashlib.blake2b(str(tuple(images.shape)).encode(), digest_size=16)
    h.update(images.detach().cpu().contiguous().numpy().tobytes())
    h.update(labels.detach().cpu().long().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_psnr(name: str, psnr: float) -> float:
    """``psnr`` as a float, or ``ValueError`` naming it when it is not a number in range."""
    lo, hi = PSNR_RANGE_DB
    if isinstance(psnr, bool) or not isinstance(psnr, numbers.Real) or not lo <= psnr <= hi:
        raise ValueError(f"{name}: psnr must be a number in [{lo}, {hi}] dB, got {psnr!r}")
    return float(psnr)


def check_num_classes(name: str, num_classes: int | None, minimum: int = 1) -> int | None:
    """``num_classes`` as an int (or None), or ``ValueError`` naming it."""
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise ValueError(f"{name}: num_classes must be an integer, got {num_classes!r}")
    if num_classes < minimum:
        raise ValueError(f"{name}: num_classes must be >= {minimum}, got {num_classes}")
    return int(num_classes)


def check_labels(name: str, labels: torch.Tensor, num_classes: int | None) -> None:
    """``ValueError`` naming ``labels`` unless they lie in [0, num_classes) (>= 0 if None)."""
    if not labels.numel():
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        bound = "inf" if num_classes is None else num_classes
        raise ValueError(f"{name}: labels must lie in [0, {bound}), got [{lo}, {hi}]")


class _RandomNoiseMethod(ProtectionMethod):
    """Shared part of the random-noise controls: arguments, calibration, storage."""

    def __init__(
        self,
        surrogates: list[nn.Module] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        seed: int = 0,
        psnr: float = 33.0,
        pattern: str = "uniform",
        grid: int = 8,
        num_classes: int | None = None,
    ) -> None:
        # Random noise needs no surrogate, and elementwise work this cheap stays on the CPU,
        # which also keeps the output bit-identical whatever device a grid runs on.
        super().__init__(surrogates=None, device=device, batch_size=batch_size, seed=seed)
        if self.batch_size < 1:
            raise ValueError(f"{self.name}: batch_size must be >= 1, got {batch_size}")
        self.psnr = check_psnr(self.name, psnr)
        if pattern not in PATTERNS:
            raise ValueError(f"{self.name}: pattern must be one of {PATTERNS}, got {pattern!r}")
        if isinstance(grid, bool) or not isinstance(grid, numbers.Integral) or grid < 1:
            raise ValueError(f"{self.name}: grid must be an integer >= 1, got {grid!r}")
        self.pattern = pattern
        self.grid = int(grid)
        self.requested_classes = check_num_classes(self.name, num_classes)
        self.num_classes = self.requested_classes
        self.scale: float | None = None
        self.psnr_fit: float | None = None

    def _pattern(self, stream: int, index: int, shape: tuple[int, int, int]) -> torch.Tensor:
        return random_pattern(self.seed, stream, index, shape, self.pattern, self.grid)

    def _check_fit(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        check_images_labels(images, labels)
        if len(images) == 0:
            raise ValueError(f"{self.name}: fit needs at least one image")
        check_labels(self.name, labels, self.requested_classes)

    def _calibrate(self, images: torch.Tensor, patterns_of: Callable[[slice], torch.Tensor]):
        self.scale, self.psnr_fit = calibrate_noise_scale(
            images, patterns_of, self.psnr, self.batch_size
        )

    def _store(
        self, images: torch.Tensor, patterns_of: Callable[[slice], torch.Tensor]
    ) -> torch.Tensor:
        if self.scale is None:
            raise RuntimeError(f"{self.name}: call fit(images, labels) before protect()")
        out = torch.empty_like(images, device="cpu")
        for sl in batches(len(images), self.batch_size):
            out[sl] = add_noise(images[sl].cpu(), patterns_of(sl), self.scale)
        return out

    def config(self) -> dict[str, Any]:
        """Name, every parameter, the calibrated scale and the PSNR it gave on the fit set."""
        return {
            "name": self.name,
            "psnr": self.psnr,
            "pattern": self.pattern,
            "grid": self.grid,
            "num_classes": self.num_classes,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "scale": self.scale,
            "psnr_fit": self.psnr_fit,
        }


class ClasswiseNoiseMethod(_RandomNoiseMethod):
    """Random class-wise noise at a target PSNR: one fixed pattern per class.

    Class ``c``'s pattern ``p_c`` ((C, H, W) in [-1, 1], :func:`random_pattern`, seeded by
    ``(seed, c)``) is added to every image of class ``c`` as ``scale * p_c`` 8-bit levels,
    and the result is rounded and clipped to 8 bits (:func:`add_noise`). The one ``scale``
    is calibrated in :meth:`fit` on the training images so that their stored copies reach
    ``psnr`` (:func:`calibrate_noise_scale`). Because the pattern depends only on the
    class, unseen images of a known class (a test split) are protected with the same
    pattern and scale.

    The random, label-correlated control of class-wise shortcut methods (Huang et al.,
    "Unlearnable examples", ICLR 2021, Table 1 "random noise" and class-wise noise).

    Args:
        surrogates: ignored (no model is involved).
        device: ignored: the work is elementwise and runs on the CPU.
        batch_size: images per batch, >= 1.
        seed: seed of the patterns.
        psnr: target mean per-image PSNR of the stored training images, in dB, within
            :data:`PSNR_RANGE_DB`.
        pattern: ``"uniform"`` (per-value uniform) or ``"lowfreq"`` (smooth, upsampled
            from a coarse grid); see :func:`random_pattern`.
        grid: coarse grid side of ``"lowfreq"``, >= 1.
        num_classes: number of classes; default ``max(labels) + 1`` at fit time.
    """

    name = "classwise_noise"
    reversible = False
    protects_unseen = True

    def class_patterns(self, shape: tuple[int, int, int]) -> torch.Tensor:
        """(K, C, H, W) float64 in [-1, 1]: the pattern of each class for images of ``shape``."""
        if self.num_classes is None:
            raise RuntimeError(f"{self.name}: call fit(images, labels) before protect()")
        return torch.stack([self._pattern(STREAM_CLASS, c, shape) for c in range(self.num_classes)])

    def fit(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Calibrates the noise scale on the training images.

        Args:
            images: (N, C, H, W) uint8, the images to protect, N >= 1.
            labels: (N,) int64 class indices in [0, num_classes).

        Sets ``num_classes``, ``scale`` (8-bit levels) and ``psnr_fit`` (dB).
        """
        self._check_fit(images, labels)
        labels = labels.long()
        self.num_classes = self.requested_classes or int(labels.max()) + 1
        patterns = self.class_patterns(tuple(images.shape[1:]))
        self._calibrate(images, lambda sl: patterns[labels[sl]])

    def protect(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Copies of ``images`` with their class's pattern added, stored as 8 bits.

        Args:
            images: (N, C, H, W) uint8, any images of the fitted classes (any size).
            labels: (N,) int64 in [0, num_classes).

        Returns:
            (N, C, H, W) uint8 on the CPU.
        """
        check_images_labels(images, labels)
        if self.scale is None:
            raise RuntimeError(f"{self.name}: call fit(images, labels) before protect()")
        check_labels(self.name, labels, self.num_classes)
        labels = labels.long().cpu()
        patterns = self.class_patterns(tuple(images.shape[1:]))
        return self._store(images, lambda sl: patterns[labels[sl]])


class SamplewiseNoiseMethod(_RandomNoiseMethod):
    """Random sample-wise noise at a target PSNR: an independent pattern per image.

    Image ``i`` of the fitted set gets pattern ``p_i`` ((C, H, W) in [-1, 1],
    :func:`random_pattern` seeded by ``(seed, i)``), added as ``scale * p_i`` 8-bit levels
    and stored as 8 bits; ``scale`` is calibrated in :meth:`fit` so that the stored images
    reach ``psnr``. Any other set of images (a test split) draws patterns from a separate
    stream, again by position, so no unseen image shares a training image's pattern; the
    scale is the fitted one.

    The label-independent control: noise of the same size that carries no class shortcut.

    Args:
        surrogates: ignored (no model is involved).
        device: ignored: the work is elementwise and runs on the CPU.
        batch_size: images per batch, >= 1.
        seed: seed of the patterns.
        psnr: target mean per-image PSNR of the stored training images, in dB, within
            :data:`PSNR_RANGE_DB`.
        pattern: ``"uniform"`` or ``"lowfreq"``; see :func:`random_pattern`.
        grid: coarse grid side of ``"lowfreq"``, >= 1.
        num_classes: when given, labels are checked to lie in [0, num_classes); the noise
            itself ignores labels.
    """

    name = "samplewise_noise"
    reversible = False
    protects_unseen = True

    #: Digest of the images and labels :meth:`fit` saw (:func:`images_fingerprint`).
    fitted_on: str | None = None

    def _patterns_of(self, images: torch.Tensor, stream: int) -> Callable[[slice], torch.Tensor]:
        shape = tuple(images.shape[1:])

        def patterns_of(sl: slice) -> torch.Tensor:
            return torch.stack([self._pattern(stream, i, shape) for i in range(sl.start, sl.stop)])

        return patterns_of

    def fit(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Calibrates the noise scale on the training images' own patterns.

        Args:
            images: (N, C, H, W) uint8, the images to protect, N >= 1.
            labels: (N,) int64 class indices (only checked).

        Sets ``scale`` (8-bit levels) and ``psnr_fit`` (dB).
        """
        self._check_fit(images, labels)
        self.fitted_on = images_fingerprint(images, labels)
        self._calibrate(images, self._patterns_of(images, STREAM_FITTED))

    def protect(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Copies of ``images``, each with its own pattern added, stored as 8 bits.

        Args:
            images: (N, C, H, W) uint8: the fitted images (in the fitted order) get the
                patterns the scale was calibrated on; any other images get fresh ones.
            labels: (N,) int64 class indices (only checked).

        Returns:
            (N, C, H, W) uint8 on the CPU.
        """
        check_images_labels(images, labels)
        if self.scale is None:
            raise RuntimeError(f"{self.name}: call fit(images, labels) before protect()")
        check_labels(self.name, labels, self.requested_classes)
        fitted = images_fingerprint(images, labels) == self.fitted_on
        stream = STREAM_FITTED if fitted else STREAM_UNSEEN
        return self._store(images, self._patterns_of(images, stream))


class OnePixelShortcutMethod(ProtectionMethod):
    """The one-pixel shortcut (OPS): one pixel per class set to one fixed colour.

    Wu, Chen, Xie and Huang, "One-Pixel Shortcut: on the learning preference of deep neural
    networks", ICLR 2023 (arXiv:2205.12141). For each class ``k`` in turn, :meth:`fit`
    searches every pixel position ``p`` and every corner colour ``xi`` of the colour cube
    (each channel 0 or 1: 8 colours for RGB, 2 for grayscale) for the pair maximising

        score(p, xi) = mean(|xi - x_p|) / std(|xi - x_p|),

    mean and (population) standard deviation taken over all clean images ``x`` of class
    ``k`` and all channels, images in [0, 1]: the change is large and nearly the same for
    every image of the class, so it makes a strong, consistent shortcut. A (position,
    colour) pair taken by an earlier class is excluded, as in the authors' code (also used
    by APBench, Qin et al. 2023). :meth:`protect` sets that pixel of every image of class
    ``k`` to the colour, so unseen images of a known class are protected the same way.
    There is no distortion budget: the fidelity table reports what OPS reaches.

    Args:
        surrogates: ignored (the search uses the clean images only).
        device: ignored: the search runs on the CPU.
        batch_size: images per batch of the search, >= 1.
        seed: unused (the search is deterministic); recorded in :meth:`config`.
        num_classes: number of classes; default ``max(labels) + 1`` at fit time.
    """

    name = "ops"
    reversible = False
    protects_unseen = True

    def __init__(
        self,
        surrogates: list[nn.Module] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        seed: int = 0,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(surrogates=None, device=device, batch_size=batch_size, seed=seed)
        if self.batch_size < 1:
            raise ValueError(f"{self.name}: batch_size must be >= 1, got {batch_size}")
        self.requested_classes = check_num_classes(self.name, num_classes)
        self.num_classes = self.requested_classes
        # Per class: (row, col), colour (C,) uint8 in {0, 255}, score; None for a class
        # without training images.
        self.positions: list[tuple[int, int] | None] = []
        self.colours: list[list[int] | None] = []
        self.scores: list[float | None] = []

    @staticmethod
    def corner_colours(channels: int) -> torch.Tensor:
        """(2**C, C) float64 in {0, 1}: colour ``v`` has channel ``c`` = bit ``C - 1 - c`` of ``v``."""
        v = torch.arange(2**channels).unsqueeze(1)
        shifts = torch.arange(channels - 1, -1, -1).unsqueeze(0)
        return ((v >> shifts) & 1).to(torch.float64)

    def class_scores(self, images: torch.Tensor) -> torch.Tensor:
        """(H * W, 2**C) float64: the OPS score of each position and colour on ``images``.

        Args:
            images: (n, C, H, W) uint8, n >= 1, the clean images of one class.

        Returns:
            ``mean / std`` of ``|colour - x|`` over images and channels; ``inf`` where the
            change is the same non-zero value everywhere (std 0), 0 where it is always 0.
        """
        n, c, h, w = images.shape
        # With each channel of the colour 0 or 1, |colour - x| is x or 1 - x, so the sums
        # of x and x^2 over the images give every colour's statistics.
        s1 = torch.zeros(c, h * w, dtype=torch.float64)
        s2 = torch.zeros_like(s1)
        for sl in batches(n, self.batch_size):
            x = from_uint8(images[sl], dtype=torch.float64).flatten(2)  # (b, C, HW)
            s1 += x.sum(dim=0)
            s2 += x.pow(2).sum(dim=0)
        ones = self.corner_colours(c).T[:, None, :]  # (C, 1, colours)
        # Per channel and colour: sum of d is n - s1 where the channel is 1, else s1; sum
        # of d^2 is n - 2 s1 + s2 where it is 1, else s2.
        total = torch.where(ones > 0, n - s1[..., None], s1[..., None]).sum(dim=0)
        total_sq = torch.where(ones > 0, n - 2 * s1[..., None] + s2[..., None], s2[..., None])
        total_sq = total_sq.sum(dim=0)  # (HW, colours)
        count = n * c
        mean = total / count
        std = (total_sq / count - mean.pow(2)).clamp_min(0.0).sqrt()
        # Differences are on the 1/255 grid; float noise below 1e-9 is no variation at all.
        constant = std < 1e-9
        score = mean / std.where(~constant, torch.ones_like(std))
        return torch.where(constant, torch.where(mean > 0, math.inf, 0.0), score)

    def fit(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Finds each class's pixel position and colour on its clean training images.

        Args:
            images: (N, C, H, W) uint8, N >= 1.
            labels: (N,) int64 class indices in [0, num_classes).

        Sets ``num_classes``, ``positions``, ``colours`` and ``scores``.
        """
        check_images_labels(images, labels)
        if len(images) == 0:
            raise ValueError(f"{self.name}: fit needs at least one image")
        check_labels(self.name, labels, self.requested_classes)
        labels = labels.long().cpu()
        images = images.cpu()
        self.num_classes = self.requested_classes or int(labels.max()) + 1
        _, c, _, w = images.shape
        colours = self.corner_colours(c)
        taken: set[tuple[int, int]] = set()
        self.positions, self.colours, self.scores = [], [], []
        for k in range(self.num_classes):
            members = (labels == k).nonzero().squeeze(1)
            if len(members) == 0:
                self.positions.append(None)
                self.colours.append(None)
                self.scores.append(None)
                continue
            score = self.class_scores(images[members])
            for point, colour in taken:
                score[point, colour] = -math.inf
            best = int(torch.argmax(score))  # first maximum: ties go to the lowest index
            point, colour = divmod(best, score.shape[1])
            taken.add((point, colour))
            self.positions.append(divmod(point, w))
            self.colours.append([int(v) * 255 for v in colours[colour].tolist()])
            self.scores.append(float(score[point, colour]))

    def protect(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Copies of ``images`` with their class's pixel set to its colour.

        Args:
            images: (N, C, H, W) uint8 of the fitted size and channels.
            labels: (N,) int64 in [0, num_classes), classes that had training images.

        Returns:
            (N, C, H, W) uint8 on the CPU, equal to ``images`` except at one pixel each.
        """
        check_images_labels(images, labels)
        if not self.positions:
            raise RuntimeError(f"{self.name}: call fit(images, labels) before protect()")
        check_labels(self.name, labels, self.num_classes)
        out = images.cpu().clone()
        labels = labels.long().cpu()
        channels = len(next(c for c in self.colours if c is not None))
        if out.shape[1] != channels:
            raise ValueError(
                f"{self.name}: fitted on {channels}-channel images, got {out.shape[1]} channels"
            )
        for k in labels.unique().tolist():
            if self.positions[k] is None:
                raise ValueError(f"{self.name}: class {k} had no training images in fit()")
            row, col = self.positions[k]
            if row >= out.shape[2] or col >= out.shape[3]:
                raise ValueError(
                    f"{self.name}: class {k}'s pixel ({row}, {col}) lies outside images of "
                    f"size {tuple(out.shape[2:])}"
                )
            colour = torch.tensor(self.colours[k], dtype=torch.uint8)
            out[labels == k, :, row, col] = colour
        return out

    def config(self) -> dict[str, Any]:
        """Name, parameters and the pixel (row, col), colour and score found for each class."""
        return {
            "name": self.name,
            "num_classes": self.num_classes,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "positions": [None if p is None else list(p) for p in self.positions],
            "colours": self.colours,
            # JSON has no infinity: a constant change (std 0) is written as "inf".
            "scores": [s if s is None or math.isfinite(s) else "inf" for s in self.scores],
        }
