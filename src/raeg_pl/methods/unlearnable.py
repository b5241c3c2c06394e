"""Error-minimising noise ("unlearnable examples"), sample-wise or class-wise, a baseline.

Huang et al., "Unlearnable examples: making personal data unexploitable", ICLR 2021. The
noise solves the bi-level min-min problem

    min_theta  E_(x, y) [ min_{|delta|_inf <= eps}  CE(f_theta(x + delta), y) ]

by alternating a few SGD steps on a source model trained on ``x + delta`` with signed-gradient
steps that *lower* each image's loss, until the source model fits the perturbed set almost
perfectly (its own stopping criterion: training accuracy on the noised data above 99%). The
noise is then an easy shortcut from image to label, so a pirate trained on the protected
images learns the noise instead of the image content.

The published loop (github.com/HanxunH/Unlearnable-Examples, ``perturbation.py`` and its
CIFAR-10 scripts): eps 8/255, step 0.8/255, 10 source-model steps per round (batch 512);
sample-wise: 20 noise steps per image per round; class-wise: one noise step per image, after
which each class's noise becomes the mean of its images' noise; both stop once the source
model's error on the noised data is below 1%. A ``rounds`` cap lets a CPU run end; whether
the criterion was met, and after how many rounds, is recorded (``criterion_met``,
``rounds_run``).

Budgets: ``eps`` (L-inf, 8-bit levels), ``psnr`` (dB; a per-image L2 ball, see
:mod:`raeg_pl.methods.pgd`), or both.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raeg_pl.attacks import pgd_linf
from raeg_pl.methods.base import ProtectionMethod, batches
from raeg_pl.methods.pgd import (
    PerturbationBudget,
    bf16_autocast,
    check_images_labels,
    store_within_eps,
)
from raeg_pl.models.classifier import create_classifier
from raeg_pl.utils.quantize import from_uint8

__all__ = ["ErrorMinimizingNoiseMethod"]


def _fingerprint(images: torch.Tensor, labels: torch.Tensor) -> tuple[tuple[int, ...], str]:
    """Shape and a digest of the bytes of ``images`` and ``labels`` (order-sensitive)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(images.detach().cpu().contiguous().numpy().tobytes())
    h.update(labels.detach().cpu().long().contiguous().numpy().tobytes())
    return tuple(images.shape), h.hexdigest()


class ErrorMinimizingNoiseMethod(ProtectionMethod):
    """Error-minimising noise within a distortion budget (unlearnable examples).

    Sample-wise (default): :meth:`fit` computes one perturbation per training image, and
    :meth:`protect` returns those same images with their noise added and stored as 8 bits,
    so it must be given exactly the images (and labels), in the same order, that ``fit``
    saw. Class-wise (``classwise=True``): one perturbation per class, added to every image
    of that class, so :meth:`protect` also protects unseen images (e.g. a test split).

    Each round of ``fit`` (Huang et al. 2021, sample-wise and class-wise min-min):

    1. ``train_steps`` SGD steps of a source model on random batches of ``x + delta``;
    2. for every image, ``pgd_steps`` steps ``delta <- P(delta - a * g)`` with the source
       model frozen in eval mode (``g`` the sign of the gradient of CE, or its L2-normalised
       gradient under a PSNR budget), ``P`` projecting onto the budget with ``x + delta`` in
       [0, 1]; class-wise, each class's noise then becomes the mean of its images' noise
       in the batch, projected onto the budget;
    3. stop once the source model's accuracy on ``x + delta`` exceeds ``stop_acc`` (the
       criterion), or after ``rounds`` rounds (the cap).

    The source model is trained from scratch here, so ``surrogates`` are accepted and ignored.

    Args:
        surrogates: ignored.
        device: where the source model and the noise updates run.
        batch_size: images per training and noise-update batch.
        seed: seed of the source model's initialisation, the initial noise and the batch
            order (CPU generators, so the noise does not depend on the device's generator).
        eps: L-inf radius in 8-bit levels (8 means 8/255), >= 0; default 8 without
            ``psnr``, no L-inf bound with it.
        step_size: noise step in 8-bit levels, default ``eps / 10`` (0.8 for eps 8, as in
            the paper's CIFAR-10 setting); with ``psnr``, a fraction of the L2 radius,
            default 0.1 (the same tenth of the budget).
        pgd_steps: noise steps per image per round, >= 1 (paper: 20 sample-wise, 1
            class-wise).
        train_steps: source-model SGD steps per round, >= 0.
        rounds: the cap on rounds, >= 1.
        stop_acc: the criterion: stop once the source accuracy on ``x + delta`` exceeds
            this, in [0, 1].
        arch: source-model architecture for
            :func:`raeg_pl.models.classifier.create_classifier`.
        num_classes: classes of the source model; default ``max(labels) + 1`` at fit time.
        lr: SGD learning rate of the source model.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        amp: bf16 autocast for the source model (CUDA only; ignored on the CPU).
        psnr: PSNR budget of the stored images in dB; None: the eps budget alone.
        classwise: one noise per class instead of one per image.

    Attributes (after :meth:`fit`):
        delta: (N, C, H, W) sample-wise or (K, C, H, W) class-wise float32 noise, CPU.
        rounds_run: rounds run.
        source_acc: the source model's accuracy on the noised images after the last round.
        source_acc_history: that accuracy after each round.
        criterion_met: whether ``source_acc > stop_acc`` (else the cap ended the fit).
    """

    name = "unlearnable"
    reversible = False
    # Sample-wise noise exists only for the fitted images: there is none for a test split.
    protects_unseen = False

    def __init__(
        self,
        surrogates: list[nn.Module] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        seed: int = 0,
        eps: float | None = None,
        step_size: float | None = None,
        pgd_steps: int = 10,
        train_steps: int = 10,
        rounds: int = 10,
        stop_acc: float = 0.99,
        arch: str = "resnet_tiny_cifar",
        num_classes: int | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        amp: bool = False,
        psnr: float | None = None,
        classwise: bool = False,
    ) -> None:
        # The source model is trained here; surrogates play no part.
        super().__init__(surrogates=None, device=device, batch_size=batch_size, seed=seed)
        self.budget = PerturbationBudget(8.0 if eps is None and psnr is None else eps, psnr)
        if pgd_steps < 1 or train_steps < 0 or rounds < 1:
            raise ValueError(
                "need pgd_steps >= 1, train_steps >= 0 and rounds >= 1, got "
                f"{pgd_steps}, {train_steps}, {rounds}"
            )
        if not 0.0 <= stop_acc <= 1.0:
            raise ValueError(f"stop_acc must be in [0, 1], got {stop_acc}")
        if step_size is None:
            step_size = 0.1 if self.budget.psnr is not None else self.budget.eps / 10.0
        if step_size < 0 or (step_size == 0 and (self.budget.psnr or self.budget.eps)):
            raise ValueError(f"step_size must be > 0, got {step_size}")
        self.eps = self.budget.eps
        self.psnr = self.budget.psnr
        self.step_size = float(step_size)
        self.pgd_steps = int(pgd_steps)
        self.train_steps = int(train_steps)
        self.rounds = int(rounds)
        self.stop_acc = float(stop_acc)
        self.arch = str(arch)
        self.requested_classes = None if num_classes is None else int(num_classes)
        self.num_classes = self.requested_classes
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.amp = bool(amp)
        self.classwise = bool(classwise)
        # Class-wise noise is a function of the label alone: it protects unseen images too.
        self.protects_unseen = self.classwise
        self.delta: torch.Tensor | None = None
        self.rounds_run: int | None = None
        self.source_acc: float | None = None
        self.criterion_met: bool | None = None
        self.source_acc_history: list[float] = []
        self._fitted_on: tuple[tuple[int, ...], str] | None = None

    # ------------------------------------------------------------------ budget
    def _radius(self, image_shape: tuple[int, ...]) -> float | None:
        return self.budget.l2_radius(image_shape)

    def _to_sphere(self, delta: torch.Tensor) -> torch.Tensor:
        """Noise (B, C, H, W) rescaled to the L2 radius of a PSNR budget (unchanged without).

        Descent has no reason to use the whole ball (a pattern the model already fits
        lowers the loss at any norm), so under a PSNR budget the noise is kept on its sphere:
        a matched budget means the same distortion as the other methods, not at most it.
        """
        radius = self._radius(tuple(delta.shape[1:]))
        if radius is None:
            return delta
        norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
        return delta * (radius / norm).view(-1, *([1] * (delta.dim() - 1)))

    def _project_noise(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """``delta`` (B, C, H, W) moved onto the budget around ``x``, with ``x + delta`` in [0, 1]."""

        def no_loss(z: torch.Tensor) -> torch.Tensor:
            raise AssertionError("no gradient step is taken")

        # Zero steps of the one PGD: only its projection onto the budget is applied.
        adv = pgd_linf(
            x,
            no_loss,
            eps=self.budget.linf,
            step_size=0.0,
            steps=0,
            start=x + delta,
            l2_radius=self._radius(tuple(x.shape[1:])),
        )
        return adv - x

    def _project_class_noise(self, delta: torch.Tensor) -> torch.Tensor:
        """Class noise (K, C, H, W) on the budget: clamped to ``eps``, then (PSNR budget)
        rescaled onto the sphere and clamped again (the second clamp only shrinks it)."""
        delta = delta.clamp(-self.budget.linf, self.budget.linf)
        return self._to_sphere(delta).clamp(-self.budget.linf, self.budget.linf)

    def _noise_of(self, delta: torch.Tensor, idx, labels: torch.Tensor) -> torch.Tensor:
        """The noise of the images ``idx`` (their own, or their class's)."""
        return delta[labels[idx]] if self.classwise else delta[idx]

    def _noised(self, images: torch.Tensor, delta: torch.Tensor, labels, idx) -> torch.Tensor:
        """(B, C, H, W) float in [0, 1]: images ``idx`` with their noise."""
        x = from_uint8(images[idx])
        return (x + self._noise_of(delta, idx, labels)).clamp_(0.0, 1.0)

    # ------------------------------------------------------------------ fit
    def fit(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Computes the error-minimising noise of every image (or class).

        Args:
            images: (N, C, H, W) uint8, the images to protect later.
            labels: (N,) int64 class indices.

        Sets ``delta``, ``rounds_run``, ``source_acc``, ``source_acc_history`` and
        ``criterion_met``.
        """
        check_images_labels(images, labels)
        if len(images) == 0:
            raise ValueError("unlearnable: fit needs at least one image")
        labels = labels.long()
        num_classes = self.requested_classes or int(labels.max()) + 1
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ValueError(
                f"unlearnable: labels must lie in [0, {num_classes}), "
                f"got [{int(labels.min())}, {int(labels.max())}]"
            )
        self.num_classes = num_classes

        generator = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = create_classifier(self.arch, num_classes, in_chans=images.shape[1])
        model.to(self.device)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )

        # A uniform start in the L-inf box (the paper's), moved onto the budget.
        rows = num_classes if self.classwise else len(images)
        linf = min(self.budget.linf, 8.0 / 255.0) if self.eps is None else self.budget.linf
        delta = torch.rand((rows, *images.shape[1:]), generator=generator)
        delta = delta.mul_(2.0).sub_(1.0).mul_(linf)
        if self.classwise:
            delta = self._project_class_noise(delta)
        else:
            for sl in batches(len(images), self.batch_size):
                delta[sl] = self._project_noise(from_uint8(images[sl]), self._to_sphere(delta[sl]))
        train_batches = self._shuffled_batches(len(images), generator)

        self.source_acc_history = []
        self.criterion_met = False
        for round_index in range(self.rounds):
            model.train()
            for _ in range(self.train_steps):
                idx = next(train_batches)
                x = self._noised(images, delta, labels, idx).to(self.device)
                y = labels[idx].to(self.device)
                with bf16_autocast(self.device, self.amp):
                    loss = F.cross_entropy(model(x).float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            model.eval()
            correct = 0
            for sl in batches(len(images), self.batch_size):
                x = from_uint8(images[sl].to(self.device))
                y = labels[sl].to(self.device)
                start = self._noise_of(delta, sl, labels).to(self.device)
                d = self._minimise_noise(model, x, y, start)
                if self.classwise:
                    delta = self._class_mean_update(delta, d.cpu(), labels[sl])
                    continue
                delta[sl] = d.cpu()
                # The model is frozen during the noise phase: a batch's final noise is final.
                with torch.no_grad(), bf16_autocast(self.device, self.amp):
                    correct += int((model(x + d).argmax(dim=1) == y).sum())
            # Class noise changes with every batch: measure once it is final.
            acc = (
                self._accuracy(model, images, labels, delta)
                if self.classwise
                else correct / len(images)
            )
            self.source_acc_history.append(acc)
            self.rounds_run = round_index + 1
            self.source_acc = acc
            if acc > self.stop_acc:
                self.criterion_met = True
                break

        self.delta = delta
        self._fitted_on = _fingerprint(images, labels)

    def _class_mean_update(
        self, delta: torch.Tensor, d: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """Each class present in the batch takes the mean noise of its images (Huang et al.)."""
        delta = delta.clone()
        for c in y.unique().tolist():
            delta[c] = d[y == c].mean(dim=0)
        return self._project_class_noise(delta)

    def _accuracy(self, model, images, labels, delta) -> float:
        """The source model's accuracy on all noised images (the stopping criterion's)."""
        correct = 0
        with torch.no_grad(), bf16_autocast(self.device, self.amp):
            for sl in batches(len(images), self.batch_size):
                x = self._noised(images, delta, labels, sl).to(self.device)
                correct += int((model(x).argmax(dim=1) == labels[sl].to(self.device)).sum())
        return correct / len(images)

    def _shuffled_batches(self, n: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """Endless random batches of indices: a fresh permutation of ``range(n)`` per epoch."""
        while True:
            order = torch.randperm(n, generator=generator)
            for sl in batches(n, self.batch_size):
                yield order[sl]

    def _minimise_noise(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        """``pgd_steps`` gradient steps that lower ``CE(model(x + delta), y)`` (PGD descent).

        Args:
            model: the frozen (eval-mode) source model.
            x: (B, C, H, W) float in [0, 1].
            y: (B,) int64 labels.
            delta: (B, C, H, W) float start noise.

        Returns:
            (B, C, H, W) noise within the budget (sample-wise under a PSNR budget: on its
            sphere, see :meth:`_to_sphere`) and ``x + delta`` in [0, 1].
        """

        def loss_fn(adv: torch.Tensor) -> torch.Tensor:
            with bf16_autocast(self.device, self.amp):
                return F.cross_entropy(model(adv).float(), y, reduction="sum")

        radius = self._radius(tuple(x.shape[1:]))
        adv = pgd_linf(
            x,
            loss_fn,
            eps=self.budget.linf,
            step_size=self.step_size / 255.0 if radius is None else self.step_size * radius,
            steps=self.pgd_steps,
            direction=-1,
            start=x + delta,
            l2_radius=radius,
        )
        if radius is None or self.classwise:
            return adv - x
        return self._project_noise(x, self._to_sphere(adv - x))

    # ------------------------------------------------------------------ protect
    def protect(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The images with their error-minimising noise, stored as 8 bits.

        Args:
            images: (N, C, H, W) uint8; sample-wise: exactly the images passed to
                :meth:`fit`, in order; class-wise: any images of the fitted classes.
            labels: (N,) int64; sample-wise: exactly the labels passed to :meth:`fit`.

        Returns:
            (N, C, H, W) uint8 on the CPU, within the budget of the input.

        Raises:
            RuntimeError: if :meth:`fit` has not been called.
            ValueError: sample-wise, if ``images``/``labels`` are not the ones ``fit`` saw:
                the noise is per image, so there is none for other images (e.g. a test
                split); class-wise, if a label has no fitted class.
        """
        check_images_labels(images, labels)
        if self.delta is None or self._fitted_on is None:
            raise RuntimeError("unlearnable: call fit(images, labels) before protect()")
        labels = labels.long()
        if self.classwise:
            if labels.numel() and (labels.min() < 0 or labels.max() >= len(self.delta)):
                raise ValueError(
                    f"unlearnable: labels must lie in [0, {len(self.delta)}) (the fitted "
                    f"classes), got [{int(labels.min())}, {int(labels.max())}]"
                )
        elif _fingerprint(images, labels) != self._fitted_on:
            raise ValueError(
                "unlearnable: protect() got images/labels that differ from those passed to "
                f"fit() (fit saw {self._fitted_on[0]}, got {tuple(images.shape)}): sample-wise "
                "error-minimising noise exists only for the fitted images, in the same order"
            )
        out = torch.empty_like(images, device="cpu")
        for sl in batches(len(images), self.batch_size):
            x = self._noised(images.cpu(), self.delta, labels.cpu(), sl)
            out[sl] = store_within_eps(x, images[sl].cpu(), self.eps)
        return out

    def config(self) -> dict[str, Any]:
        """Name, every parameter, and how ``fit`` ended: rounds run, accuracy, criterion met."""
        return {
            "name": self.name,
            "eps": self.eps,
            "psnr": self.psnr,
            "classwise": self.classwise,
            "step_size": self.step_size,
            "pgd_steps": self.pgd_steps,
            "train_steps": self.train_steps,
            "rounds": self.rounds,
            "stop_acc": self.stop_acc,
            "arch": self.arch,
            "num_classes": self.num_classes,
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "amp": self.amp,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "rounds_run": self.rounds_run,
            "source_acc": self.source_acc,
            "criterion_met": self.criterion_met,
        }
