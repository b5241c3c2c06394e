"""How class-consistent a protection's perturbation is: the share of its energy that is its
class's mean pattern, and the cosine between perturbations of the same and of different
classes.

A protection whose perturbation is mostly one fixed pattern per class is a class-wise
shortcut, which a pirate holding the labels can estimate and remove; these figures let a
reader see how far a method is from that (a random class-wise pattern has a share of 1 and a
same-class cosine of 1; independent sample-wise noise has a share near 1 / images per class
and cosines near 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raeg_pl.utils.quantize import from_uint8


def class_mean_energy(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Energy of a perturbation set that its class means explain: ``sum_c n_c |m_c|^2``.

    With ``s_c`` the sum of the class's perturbations and ``n_c`` its size, ``n_c |m_c|^2 =
    |s_c|^2 / n_c``; a class without images contributes nothing. Differentiable.

    Args:
        sums: (K, D) per-class sums of the flattened perturbations.
        counts: (K,) images per class.

    Returns:
        Scalar tensor, same dtype as ``sums``.
    """
    return ((sums**2).sum(1) / counts.to(sums.dtype).clamp_min(1)).sum()


def classmean_share(
    perturbation: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """Share of a batch perturbation's energy in its class means, differentiably.

    The ``classmean_share`` of :func:`class_structure` for one float batch: 1 for one
    pattern per class, about ``K / B`` (one over the images per class) for independent
    noise. Scale-invariant, so as a loss it moves energy from the class means into what
    varies within a class rather than shrinking the perturbation.

    Args:
        perturbation: (B, ...) float perturbations (protected minus clean).
        labels: (B,) int64 class labels in [0, num_classes).
        num_classes: number of classes K.

    Returns:
        Scalar tensor in [0, 1] (0 for a zero perturbation), gradients flow to
        ``perturbation``.
    """
    if labels.shape != perturbation.shape[:1]:
        raise ValueError(
            f"classmean_share: labels {tuple(labels.shape)} for perturbations "
            f"{tuple(perturbation.shape)}"
        )
    # In float32 at least, also under mixed-precision autocast: the share is a ratio of sums.
    with torch.autocast(perturbation.device.type, enabled=False):
        d = perturbation.flatten(1)
        d = d if d.dtype == torch.float64 else d.float()
        onehot = F.one_hot(labels.long(), num_classes).to(d.dtype)  # (B, K)
        explained = class_mean_energy(onehot.T @ d, onehot.sum(0))
        return energy_share(explained, (d**2).sum())


def energy_share(part: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``part / total`` for energies, 0 with zero gradients where ``total`` is 0.

    A share of a zero perturbation (a generator at the identity, before any warm-up) is 0;
    dividing by a clamped total instead gives 0 * inf = NaN gradients.
    """
    nonzero = total > 0
    return torch.where(nonzero, part / torch.where(nonzero, total, 1.0), 0.0)


def class_structure(
    clean: torch.Tensor,
    protected: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int | None = None,
    batch_size: int = 1024,
) -> dict[str, float]:
    """Class structure of the perturbations ``protected - clean`` of a labelled image set.

    With ``d_i`` the perturbation of image ``i`` (flattened, in [0, 1] units), ``m_c`` the mean
    perturbation of class ``c`` and ``u_i = d_i / |d_i|``:

    * ``classmean_share`` = sum_i |m_{y_i}|^2 / sum_i |d_i|^2, the fraction of the energy
      that the class means explain (the rest varies within classes);
    * ``cos_same_class``: the mean cosine ``u_i . u_j`` over pairs ``i != j`` of one class,
      averaged over classes with at least two images;
    * ``cos_diff_class``: the mean cosine over pairs of different classes.

    Both cosines are computed exactly from per-class sums of ``u_i`` (no pair sampling).
    Images with a zero perturbation count in the share but not in the cosines.

    Args:
        clean: (N, C, H, W) uint8 originals.
        protected: (N, C, H, W) uint8 protected images, as stored.
        labels: (N,) int64 class labels in [0, num_classes).
        num_classes: number of classes (default: ``labels.max() + 1``).
        batch_size: images converted to float at a time.

    Returns:
        ``{"classmean_share", "cos_same_class", "cos_diff_class"}``; a cosine is NaN when no
        pair exists (one image per class, or one class).

    Raises:
        ValueError: shapes that differ, non-uint8 images, or labels outside the classes.
    """
    if clean.shape != protected.shape or clean.ndim != 4:
        raise ValueError(
            "class_structure: clean and protected must both be (N, C, H, W), got "
            f"{tuple(clean.shape)} and {tuple(protected.shape)}"
        )
    if clean.dtype != torch.uint8 or protected.dtype != torch.uint8:
        raise ValueError("class_structure: images must be uint8 as stored")
    if labels.shape != clean.shape[:1]:
        raise ValueError(f"class_structure: labels {tuple(labels.shape)} for {len(clean)} images")
    labels = labels.long()
    k = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(f"class_structure: labels must lie in [0, {k}), got {labels.unique()}")
    dim = clean[0].numel()
    sums = torch.zeros(k, dim, dtype=torch.float64)  # sum of d_i per class
    unit_sums = torch.zeros(k, dim, dtype=torch.float64)  # sum of u_i per class
    counts = torch.zeros(k, dtype=torch.float64)  # images per class
    unit_counts = torch.zeros(k, dtype=torch.float64)  # images with d_i != 0 per class
    energy = 0.0
    for i in range(0, len(clean), batch_size):
        d = (
            from_uint8(protected[i : i + batch_size], torch.float64)
            - from_uint8(clean[i : i + batch_size], torch.float64)
        ).flatten(1)
        y = labels[i : i + batch_size]
        norms = d.norm(dim=1)
        nonzero = norms > 0
        energy += float((norms**2).sum())
        sums.index_add_(0, y, d)
        counts += torch.bincount(y, minlength=k).double()
        unit_sums.index_add_(0, y[nonzero], d[nonzero] / norms[nonzero, None])
        unit_counts += torch.bincount(y[nonzero], minlength=k).double()
    explained = float(class_mean_energy(sums, counts))
    share = explained / energy if energy > 0 else float("nan")

    # Same class: |sum u|^2 = n + sum over ordered pairs i != j of u_i . u_j.
    sq = (unit_sums**2).sum(1)
    pairs = unit_counts * (unit_counts - 1)
    ok = pairs > 0
    cos_same = float(((sq[ok] - unit_counts[ok]) / pairs[ok]).mean()) if ok.any() else float("nan")
    # Different classes: total over all pairs minus the same-class part.
    total = unit_sums.sum(0)
    cross = float((total**2).sum() - sq.sum())
    n = unit_counts.sum()
    cross_pairs = float(n**2 - (unit_counts**2).sum())
    cos_diff = cross / cross_pairs if cross_pairs > 0 else float("nan")
    return {"classmean_share": share, "cos_same_class": cos_same, "cos_diff_class": cos_diff}


__all__ = ["class_mean_energy", "class_structure", "classmean_share"]
