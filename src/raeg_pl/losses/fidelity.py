"""Fidelity and reversibility losses, 8-bit quantisation and PSNR (pure tensor functions).

Terms of the RAEG objective (docs/raeg-method.md, section 3) that keep the protected image
``x_p = G(x)`` close to the original ``x`` and the recovery ``G^-1(Q(x_p))`` from the stored
8-bit file close to ``x``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# 8-bit storage with a straight-through gradient (its range penalty is
# :func:`out_of_range_penalty`); re-exported as part of this module's API.
from raeg_pl.utils.quantize import quantize_ste

__all__ = [
    "RANGE_LOSSES",
    "fidelity_loss",
    "lost_to_storage",
    "out_of_range_penalty",
    "psnr",
    "quantize_ste",
    "range_hinge_penalty",
    "range_penalty",
    "recovery_loss",
]

#: Forms of the protector's range term: :func:`out_of_range_penalty` and :func:`range_hinge_penalty`.
RANGE_LOSSES = ("quadratic", "hinge")


def fidelity_loss(protected: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Image fidelity term ``MSE(x_p, x)`` of the RAEG objective.

    Args:
        protected: (B, C, H, W) protected images ``G(x)``, float, nominally in [0, 1].
        original: (B, C, H, W) original images in [0, 1].

    Returns:
        Scalar mean squared error over all elements.
    """
    return F.mse_loss(protected, original)


def recovery_loss(recovered: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Reversibility term ``MSE(G^-1(Q(x_p)), x)`` of the RAEG objective.

    The caller computes ``recovered = G.inverse(quantize_ste(protected))`` so that the loss
    measures recovery from the stored 8-bit image, not from the exact float output (which
    an invertible network recovers to ~1e-6 anyway).

    Args:
        recovered: (B, C, H, W) recovered images, float.
        original: (B, C, H, W) original images in [0, 1].

    Returns:
        Scalar mean squared error over all elements.
    """
    return F.mse_loss(recovered, original)


def lost_to_storage(log_det: torch.Tensor, values: int) -> torch.Tensor:
    """What 8-bit storage of the protected image loses, in nats per value (the protector's
    ``l_volume`` term): ``mean(max(0, -log|det dG/dx|) / values)`` over the batch.

    Args:
        log_det: (B,) ``log|det dG/dx|`` per image
            (:meth:`~raeg_pl.models.protector.InvertibleProtector.forward_log_det`).
        values: values per image (``C * H * W``).

    Returns:
        Scalar; 0 when the generator shrinks no image's volume.
    """
    return (-log_det / values).clamp(min=0).mean()


def out_of_range_penalty(x: torch.Tensor) -> torch.Tensor:
    """Quadratic penalty on values outside [0, 1]: ``mean(relu(x - 1)**2 + relu(-x)**2)``.

    Storage clips to [0, 1]; clipped values cannot be inverted, so the generator is taught to
    stay in range (as in invertible image hiding/rescaling work, e.g. Xiao et al.,
    "Invertible image rescaling", ECCV 2020, which also quantises and clips its output).

    Args:
        x: float tensor of any shape.

    Returns:
        Scalar, zero exactly when every value lies in [0, 1].
    """
    return (F.relu(x - 1.0).square() + F.relu(-x).square()).mean()


def range_hinge_penalty(x: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Linear hinge on values outside ``[margin, 1 - margin]``: ``mean(relu(margin - x) + relu(x - 1 + margin))``.

    Unlike :func:`out_of_range_penalty`, whose quadratic cost of a 4-level excursion below 0
    (``(4/255)**2``, averaged over every pixel) is negligible beside the adversarial term,
    the hinge's gradient is the same for every value out of range however small the
    excursion (127 times the quadratic's at one level out, at the same weight), so it keeps
    what the protector adds on saturated regions (black backgrounds, blown highlights) from
    being clipped away by 8-bit storage, where the inverse cannot recover it. On the digits
    (``experiments/protect/digits_quick.yaml``) a protector weight ``l_range`` of 100 took
    the recovery from 38-39 dB to 45-46 dB; 10 and 30 reached 39 and 41 dB, and 1000 wrecked
    training (the protected images fell to 9 dB).

    Args:
        x: float values before storage of any shape, nominally in [0, 1].
        margin: how far inside [0, 1] the hinge starts (``1/255`` is one 8-bit level); 0
            leaves the whole range free, negative values tolerate excursions that rounding
            still maps onto the range (``-0.5/255``).

    Returns:
        Scalar, zero exactly when every value lies in ``[margin, 1 - margin]``.
    """
    if not -0.5 < margin < 0.5:
        raise ValueError(f"margin must lie in (-0.5, 0.5), got {margin}")
    excess = F.relu(margin - x) + F.relu(x - (1.0 - margin))
    return excess.mean()


def range_penalty(x: torch.Tensor, kind: str = "quadratic", margin: float = 0.0) -> torch.Tensor:
    """The protector's range term of the given kind (one of :data:`RANGE_LOSSES`).

    Args:
        x: (B, C, H, W) float values before storage.
        kind: ``"quadratic"`` (:func:`out_of_range_penalty`, ``margin`` unused) or
            ``"hinge"`` (:func:`range_hinge_penalty`).
        margin: the hinge's margin.

    Returns:
        Scalar penalty.
    """
    if kind == "quadratic":
        return out_of_range_penalty(x)
    if kind == "hinge":
        return range_hinge_penalty(x, margin)
    raise ValueError(f"range loss must be one of {RANGE_LOSSES}, got {kind!r}")


def psnr(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 1.0,
    reduction: str = "mean",
    eps: float = 1e-10,
) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, computed per image and averaged over the batch.

    ``PSNR = 10 * log10(data_range**2 / MSE)``, MSE taken over (C, H, W) of each image. The
    MSE is floored at ``eps`` so identical images give a large finite value (100 dB for the
    defaults) instead of infinity, which keeps running averages and controllers finite.

    Args:
        a: (B, C, H, W) or (B, ...) images.
        b: tensor of the same shape as ``a``.
        data_range: value range of the images (1.0 for [0, 1], 255.0 for 8-bit integers).
        reduction: ``"mean"`` for the batch mean (scalar) or ``"none"`` for (B,) values.
        eps: floor on the per-image MSE.

    Returns:
        Scalar (``"mean"``) or (B,) tensor of PSNR values in dB.
    """
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    diff = a.float() - b.float()
    mse = diff.square().reshape(diff.shape[0], -1).mean(dim=1).clamp_min(eps)
    values = 10.0 * torch.log10(data_range**2 / mse)
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
