"""Adversarial and classifiability losses on classifier logits (pure tensor functions).

Terms of the RAEG objective (docs/raeg-method.md, section 3): ``L_adv`` makes surrogate
classifiers misclassify the (defended) protected images; ``CE(f(x_rec), y)`` keeps the
recovered images classifiable. Every adversarial loss is capped so it stops pushing once an
image is misclassified with a margin, which bounds the distortion spent per image.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "class_margin",
    "keep_classifiable_loss",
    "label_permutation",
    "targeted_adversarial_loss",
    "targeted_labels",
    "untargeted_adversarial_loss",
]


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def class_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logit margin of a class over the best other class: ``z_c - max_{j != c} z_j``.

    Positive when class ``c`` wins, negative when another class wins.

    Args:
        logits: (B, K) unnormalised scores, K >= 2.
        labels: (B,) int64 class indices in [0, K).

    Returns:
        (B,) margins, differentiable w.r.t. ``logits``.
    """
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"expected (B, K >= 2) logits, got shape {tuple(logits.shape)}")
    labels = labels.long().reshape(-1, 1)
    own = logits.gather(1, labels).squeeze(1)
    is_own = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, labels, True)
    best_other = logits.masked_fill(is_own, float("-inf")).amax(dim=1)
    return own - best_other


def untargeted_adversarial_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    kappa: float = 5.0,
    kind: Literal["margin", "capped_ce"] = "margin",
    reduction: str = "mean",
) -> torch.Tensor:
    """Capped untargeted adversarial loss; minimising it moves images off their true class.

    ``kind="margin"`` (default): the C&W margin loss with confidence ``kappa`` (Carlini &
    Wagner, "Towards evaluating the robustness of neural networks", IEEE S&P 2017, f_6),
    per sample ``max(z_y - max_{j != y} z_j, -kappa)``. Once an image is misclassified by
    more than ``kappa`` logits its loss is constant and its gradient exactly zero.

    ``kind="capped_ce"``: negative cross-entropy capped at ``-kappa`` (the usual untargeted
    objective of FGSM/PGD, Goodfellow et al. 2015, Madry et al. 2018, with a cap), per sample
    ``max(-CE(z, y), -kappa)``; the push stops once ``p_y < exp(-kappa)``.

    Args:
        logits: (B, K) surrogate logits of the (defended) protected images.
        labels: (B,) int64 true labels.
        kappa: cap, >= 0; in logit units for ``"margin"``, in nats for ``"capped_ce"``.
        kind: ``"margin"`` or ``"capped_ce"``.
        reduction: ``"mean"`` (scalar batch mean) or ``"none"`` ((B,) per-sample values).

    Returns:
        Scalar or (B,) loss, bounded below by ``-kappa``.
    """
    if kind == "margin":
        values = class_margin(logits, labels)
    elif kind == "capped_ce":
        values = -F.cross_entropy(logits, labels.long(), reduction="none")
    else:
        raise ValueError(f"kind must be 'margin' or 'capped_ce', got {kind!r}")
    return _reduce(torch.clamp(values, min=-kappa), reduction)


def targeted_adversarial_loss(
    logits: torch.Tensor,
    target_labels: torch.Tensor,
    kappa: float = 5.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Capped targeted C&W margin loss; minimising it moves images into a target class.

    Per sample ``max(max_{j != t} z_j - z_t, -kappa)`` (Carlini & Wagner, IEEE S&P 2017,
    f_6 with confidence ``kappa``). Class-targeted perturbations with a fixed label
    permutation are the strong setting of adversarial poisoning (Fowl et al., "Adversarial
    examples make strong poisons", NeurIPS 2021). Once the target class wins by more than
    ``kappa`` logits the loss is constant and its gradient exactly zero.

    Args:
        logits: (B, K) surrogate logits of the (defended) protected images.
        target_labels: (B,) int64 target classes, e.g. from :func:`targeted_labels`.
        kappa: cap in logit units, >= 0.
        reduction: ``"mean"`` (scalar batch mean) or ``"none"`` ((B,) per-sample values).

    Returns:
        Scalar or (B,) loss, bounded below by ``-kappa``.
    """
    values = -class_margin(logits, target_labels)
    return _reduce(torch.clamp(values, min=-kappa), reduction)


def label_permutation(num_classes: int, seed: int = 0) -> torch.Tensor:
    """Fixed derangement of class indices: no class maps to itself.

    Built as one random cycle through all classes, so it is a derangement for every
    ``num_classes >= 2`` and reproducible from ``seed`` (CPU ``torch.Generator``).

    Args:
        num_classes: number of classes K, >= 2.
        seed: seed of the cycle order.

    Returns:
        (K,) int64 tensor ``perm`` with ``perm[c]`` the target class of class ``c``.
    """
    if num_classes < 2:
        raise ValueError(f"a derangement needs at least 2 classes, got {num_classes}")
    order = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed))
    perm = torch.empty(num_classes, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm


def targeted_labels(labels: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """Target class of each sample under a fixed label permutation.

    Args:
        labels: (B,) int64 true labels in [0, K).
        permutation: (K,) int64 permutation from :func:`label_permutation`.

    Returns:
        (B,) int64 target labels on ``labels``' device.
    """
    return permutation.to(labels.device)[labels.long()]


def keep_classifiable_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the recovered images' logits: keeps recovery classifiable.

    The ``l_keep * CE(f(x_rec), y)`` term of the RAEG objective (docs/raeg-method.md, 3).

    Args:
        logits: (B, K) surrogate logits of the recovered images.
        labels: (B,) int64 true labels.

    Returns:
        Scalar mean cross-entropy in nats.
    """
    return F.cross_entropy(logits, labels.long())
