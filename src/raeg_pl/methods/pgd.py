"""PGD baselines: adversarial examples and class-targeted adversarial poisoning.

Both perturb each image with projected gradient descent on the cross-entropy of a frozen
surrogate ensemble, and store the result as 8-bit images. Neither is reversible: the
original is not recoverable from the stored image.

Budgets (:class:`PerturbationBudget`, shared by every attack-based baseline): an L-inf
radius ``eps`` in 8-bit levels (the papers' threat model), a PSNR ``psnr`` in dB, or both.
A PSNR budget is an L2 ball of per-image radius ``sqrt(N * MSE_target)`` in the PGD
projection (:func:`raeg_pl.attacks.l2_radius_for_psnr`), intersected with the [0, 1] box
(and the eps box when both are given). Why a ball and not a calibrated L-inf eps: PSNR is a
per-image L2 quantity, so the ball holds the budget for *every* image (not only on
average over a calibration subset), needs no extra attack runs, and lets the attack place
its distortion where the surrogate is sensitive, as RAEG's generator may (RAEG's own budget
is a PSNR target, reached with L-inf ~39/255). The radius leaves room for the expected
8-bit rounding error, so the stored images land on the target (measured on CIFAR-10: within
0.05 dB); images with many saturated pixels may stay above it, since the box cuts their
perturbation.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raeg_pl.attacks import l2_radius_for_psnr, pgd_linf
from raeg_pl.losses import label_permutation, targeted_labels
from raeg_pl.methods.base import ProtectionMethod, batches
from raeg_pl.utils.quantize import from_uint8, to_uint8

__all__ = [
    "PGDMethod",
    "PerturbationBudget",
    "TargetedPoisonMethod",
    "bf16_autocast",
    "check_images_labels",
    "store_within_eps",
]


def check_images_labels(images: torch.Tensor, labels: torch.Tensor) -> None:
    """Raises ``ValueError`` unless ``images`` is (N, C, H, W) uint8 and ``labels`` (N,)."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"expected (N, C, H, W) uint8 images, got {images.dtype} of shape {tuple(images.shape)}"
        )
    if labels.dim() != 1 or len(labels) != len(images):
        raise ValueError(f"expected ({len(images)},) labels, got shape {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise ValueError(f"labels must be integer class indices, got {labels.dtype}")


def store_within_eps(x: torch.Tensor, original: torch.Tensor, eps: float | None) -> torch.Tensor:
    """The 8-bit storage step of a perturbation that must stay within ``eps`` levels.

    Rounds ``x`` to 8 bits and clamps each value to ``original +- floor(eps)``: rounding a
    value that sits exactly on a non-integer ball boundary (e.g. ``eps = 4.5``) would
    otherwise step one level outside the ball.

    Args:
        x: (N, C, H, W) float in [0, 1], the perturbed images.
        original: (N, C, H, W) uint8, the images ``x`` was perturbed from.
        eps: L-inf radius in 8-bit levels, >= 0; None: no L-inf bound (a PSNR budget only).

    Returns:
        (N, C, H, W) uint8 on ``original``'s device with ``|out - original| <= floor(eps)``.
    """
    if eps is None:
        return to_uint8(x.float()).to(original.device)
    levels = int(math.floor(eps + 1e-6))
    base = original.to(device=x.device, dtype=torch.int16)
    q = to_uint8(x.float()).to(torch.int16)
    q = torch.minimum(torch.maximum(q, base - levels), base + levels).clamp(0, 255)
    return q.to(device=original.device, dtype=torch.uint8)


def bf16_autocast(device: torch.device, enabled: bool):
    """A bf16 autocast on CUDA when ``enabled``; a no-op context everywhere else."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pgd_step_size(eps: float, steps: int, step_size: float | None) -> float:
    """A checked PGD budget's step size in 8-bit levels (default 2.5 * eps / steps, Madry et al.)."""
    if eps < 0:
        raise ValueError(f"eps must be >= 0 (8-bit levels), got {eps}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if step_size is None:
        step_size = 2.5 * eps / steps if steps > 0 else 0.0
    if step_size < 0 or (steps > 0 and eps > 0 and step_size == 0):
        raise ValueError(f"step_size must be > 0 (8-bit levels), got {step_size}")
    return float(step_size)


class PerturbationBudget:
    """A distortion budget: an L-inf radius, a PSNR target, or both.

    Args:
        eps: L-inf radius in 8-bit levels (6 means 6/255), >= 0; None: no L-inf bound.
        psnr: PSNR target of the stored images in dB, > 0; None: no L2 bound.

    At least one of the two must be given.
    """

    def __init__(self, eps: float | None, psnr: float | None) -> None:
        if eps is None and psnr is None:
            raise ValueError("a perturbation budget needs eps (8-bit levels) or psnr (dB)")
        if eps is not None and eps < 0:
            raise ValueError(f"eps must be >= 0 (8-bit levels), got {eps}")
        if psnr is not None and psnr <= 0:
            raise ValueError(f"psnr must be > 0 (dB), got {psnr}")
        self.eps = None if eps is None else float(eps)
        self.psnr = None if psnr is None else float(psnr)

    @property
    def linf(self) -> float:
        """The L-inf box radius in [0, 1] units (1.0, i.e. only the image range, without eps)."""
        return 1.0 if self.eps is None else self.eps / 255.0

    def l2_radius(self, shape: tuple[int, ...]) -> float | None:
        """L2 radius in [0, 1] units of one image of ``shape`` (C, H, W, ...); None without psnr."""
        if self.psnr is None:
            return None
        return l2_radius_for_psnr(self.psnr, math.prod(shape))

    def step(self, steps: int, step_size: float | None) -> float:
        """The PGD step in the units ``pgd_linf`` takes ([0, 1] units or relative L2).

        With a PSNR budget, steps follow the L2-normalised gradient and ``step_size`` is a
        fraction of the image's L2 radius (default ``2.5 / steps``, Madry et al.'s rule);
        the caller multiplies it by the radius. Else it is in 8-bit levels per value
        (default ``2.5 * eps / steps``) and is returned in [0, 1] units.
        """
        if self.psnr is not None:
            if steps < 0:
                raise ValueError(f"steps must be >= 0, got {steps}")
            if step_size is None:
                step_size = 2.5 / steps if steps > 0 else 0.0
            if step_size < 0 or (steps > 0 and step_size == 0):
                raise ValueError(
                    f"step_size must be > 0 (fraction of the L2 radius), got {step_size}"
                )
            return float(step_size)
        return pgd_step_size(self.eps, steps, step_size) / 255.0

    def config(self) -> dict[str, Any]:
        """The budget's fields."""
        return {"eps": self.eps, "psnr": self.psnr}


def early_stop_stats(infos: list[dict], steps: int) -> dict[str, Any]:
    """Means over the batches of a PGD run: gradient steps taken and early-stopped share."""
    if not infos:
        return {}
    return {
        "mean_steps_run": sum(i["steps"] for i in infos) / len(infos),
        "max_steps": steps,
        "stopped_early_batches": sum(bool(i["stopped_early"]) for i in infos),
        "batches": len(infos),
    }


class PGDMethod(ProtectionMethod):
    """Untargeted L-inf PGD adversarial examples against a surrogate ensemble.

    Projected gradient ascent on the cross-entropy of the true label (Madry et al.,
    "Towards deep learning models resistant to adversarial attacks", ICLR 2018), averaged
    over the surrogates: per step ``x <- P(x + a * sign(grad_x mean_k CE(f_k(x), y)))``
    where ``P`` projects onto ``{|x - x0|_inf <= eps} ∩ [0, 1]``
    (:func:`raeg_pl.attacks.pgd_linf`); with a ``psnr`` budget, onto the per-image L2 ball
    of that PSNR as well, with L2-normalised gradient steps (see the module docstring). The
    random start is uniform in the eps box (projected onto the ball). Images are processed
    in float [0, 1] and stored as 8 bits (:func:`store_within_eps`).

    At full strength (Fowl et al., "Adversarial examples make strong poisons", NeurIPS
    2021): 250 steps of size ``0.1 * eps``; ``patience`` stops a batch early once its
    summed loss stopped improving, which keeps such step counts affordable on a CPU.

    Args:
        surrogates: frozen classifiers (logits from [0, 1] images); at least one is needed
            to protect. They are put in eval mode with parameter gradients off.
        device: where the attack runs.
        batch_size: images per attack batch.
        seed: seed of the random start (a CPU ``torch.Generator``, so results do not depend
            on the device's random number generator).
        eps: L-inf radius in 8-bit levels (6 means 6/255), >= 0; default 6 without
            ``psnr``, no L-inf bound with it.
        step_size: step in 8-bit levels; default ``2.5 * eps / steps`` (Madry et al.). With
            ``psnr``: the L2 step as a fraction of each image's radius, default
            ``2.5 / steps``.
        steps: gradient steps, >= 0.
        random_start: start from a uniform point in the eps ball instead of the image.
        amp: run the surrogates under bf16 autocast (CUDA only; ignored on the CPU).
        psnr: PSNR budget of the stored images in dB (see the module docstring); None: the
            eps budget alone.
        patience: stop a batch's attack once its loss has not improved (by a relative
            ``min_improvement``) for this many steps, keeping the best iterate; None: run
            all ``steps``.
        min_improvement: relative loss improvement that counts for ``patience``.

    Attributes:
        stats: after :meth:`protect`, the mean gradient steps run per batch and how many
            batches stopped early.
    """

    name = "pgd"
    reversible = False
    #: +1 ascends the cross-entropy (away from the label), -1 descends it (toward a target).
    direction: int = 1

    def __init__(
        self,
        surrogates: list[nn.Module] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        seed: int = 0,
        eps: float | None = None,
        step_size: float | None = None,
        steps: int = 10,
        random_start: bool = True,
        amp: bool = False,
        psnr: float | None = None,
        patience: int | None = None,
        min_improvement: float = 1e-3,
    ) -> None:
        super().__init__(surrogates=surrogates, device=device, batch_size=batch_size, seed=seed)
        self.budget = PerturbationBudget(6.0 if eps is None and psnr is None else eps, psnr)
        self.eps = self.budget.eps
        self.psnr = self.budget.psnr
        self.step = self.budget.step(steps, step_size)
        # In 8-bit levels (L-inf budget) or as a fraction of the L2 radius (PSNR budget).
        self.step_size = self.step if self.psnr is not None else self.step * 255.0
        self.steps = int(steps)
        self.random_start = bool(random_start)
        self.amp = bool(amp)
        if patience is not None and int(patience) < 1:
            raise ValueError(f"patience must be >= 1 or None, got {patience}")
        self.patience = None if patience is None else int(patience)
        self.min_improvement = float(min_improvement)
        self.stats: dict[str, Any] = {}

    def _attack_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The class each image's cross-entropy is taken against: its own label."""
        return labels.long()

    def protect(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """PGD-perturbed copies of ``images``.

        Args:
            images: (N, C, H, W) uint8.
            labels: (N,) int64 true labels.

        Returns:
            (N, C, H, W) uint8 on the CPU, each value within ``floor(eps)`` levels of the input.
        """
        check_images_labels(images, labels)
        models = self.frozen_surrogates()
        generator = torch.Generator().manual_seed(self.seed)
        out = torch.empty_like(images, device="cpu")
        infos: list[dict] = []
        for sl in batches(len(images), self.batch_size):
            infos.append({})
            out[sl] = self._attack_batch(images[sl], labels[sl], models, generator, infos[-1]).cpu()
        self.stats = early_stop_stats(infos, self.steps)
        return out

    def _attack_batch(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        models: list[nn.Module],
        generator: torch.Generator,
        info: dict | None = None,
    ) -> torch.Tensor:
        """One batch: (B, C, H, W) uint8 in, (B, C, H, W) uint8 perturbed out."""
        x0 = from_uint8(images.to(self.device))
        y = self._attack_labels(labels).to(self.device)

        def loss_fn(x: torch.Tensor) -> torch.Tensor:
            with bf16_autocast(self.device, self.amp):
                # Per-sample losses summed over the batch: each image's gradient is its own.
                losses = [F.cross_entropy(m(x).float(), y, reduction="sum") for m in models]
                return torch.stack(losses).mean()

        radius = self.budget.l2_radius(tuple(x0.shape[1:]))
        # The generator is a CPU one, so the random start is the same on every device.
        x = pgd_linf(
            x0,
            loss_fn,
            eps=self.budget.linf,
            step_size=self.step if radius is None else self.step * radius,
            steps=self.steps,
            direction=self.direction,
            random_start=self.random_start,
            generator=generator,
            l2_radius=radius,
            patience=self.patience,
            min_improvement=self.min_improvement,
            info=info,
        )
        return store_within_eps(x, images.to(self.device), self.eps)

    def config(self) -> dict[str, Any]:
        """Name and every parameter that determines the output."""
        cfg = {
            "name": self.name,
            "eps": self.eps,
            "psnr": self.psnr,
            "step_size": self.step_size,
            "steps": self.steps,
            "patience": self.patience,
            "min_improvement": self.min_improvement,
            "random_start": self.random_start,
            "amp": self.amp,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_surrogates": len(self.surrogates),
        }
        if self.stats:
            cfg["stats"] = dict(self.stats)
        return cfg


class TargetedPoisonMethod(PGDMethod):
    """Adversarial poisoning: class-targeted PGD toward a fixed label derangement.

    Every image of class ``c`` is pushed toward class ``perm[c]`` by projected gradient
    descent on ``mean_k CE(f_k(x), perm[y])``, with ``perm`` a fixed derangement from
    :func:`raeg_pl.losses.label_permutation` (seeded by ``seed``), so no class targets
    itself. Training on such images teaches a pirate the wrong, consistent class features
    (Fowl et al., "Adversarial examples make strong poisons", NeurIPS 2021).

    Args:
        num_classes: number of classes; default: the surrogates' ``num_classes`` attribute
            (set by :func:`raeg_pl.lit.protector.load_surrogate`), else the width of their
            logits on the first batch.

    The other arguments are those of :class:`PGDMethod`; ``seed`` also fixes the permutation.
    """

    name = "poison"
    direction = -1

    def __init__(
        self,
        surrogates: list[nn.Module] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        seed: int = 0,
        eps: float | None = None,
        step_size: float | None = None,
        steps: int = 10,
        random_start: bool = True,
        amp: bool = False,
        psnr: float | None = None,
        patience: int | None = None,
        min_improvement: float = 1e-3,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(
            surrogates=surrogates,
            device=device,
            batch_size=batch_size,
            seed=seed,
            eps=eps,
            step_size=step_size,
            steps=steps,
            random_start=random_start,
            amp=amp,
            psnr=psnr,
            patience=patience,
            min_improvement=min_improvement,
        )
        num_classes = self.surrogate_num_classes(num_classes)
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 for a derangement, got {num_classes}")
        self.num_classes = num_classes

    @property
    def permutation(self) -> torch.Tensor:
        """(K,) int64 target class of each class (a derangement)."""
        if self.num_classes is None:
            raise ValueError(
                "poison: num_classes unknown; pass num_classes= or surrogates that set it"
            )
        return label_permutation(self.num_classes, self.seed)

    def _attack_labels(self, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"poison: labels must lie in [0, {self.num_classes}), "
                f"got [{int(labels.min())}, {int(labels.max())}]"
            )
        return targeted_labels(labels, self.permutation)

    def protect(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Class-targeted poisons of ``images``; see :meth:`PGDMethod.protect`."""
        check_images_labels(images, labels)
        if self.num_classes is None and len(images):
            with torch.no_grad():
                probe = from_uint8(images[:1].to(self.device))
                self.num_classes = int(self.frozen_surrogates()[0](probe).shape[1])
        return super().protect(images, labels)

    def config(self) -> dict[str, Any]:
        """Name, every PGD parameter, the class count and the target of each class."""
        cfg = super().config()
        cfg["num_classes"] = self.num_classes
        cfg["target_permutation"] = None if self.num_classes is None else self.permutation.tolist()
        return cfg
