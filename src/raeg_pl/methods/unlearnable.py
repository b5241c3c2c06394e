"""Sample-wise error-minimising noise ("unlearnable examples") as a protection baseline.

Huang et al., "Unlearnable examples: making personal data unexploitable", ICLR 2021. The
noise solves the bi-level min-min problem

    min_theta  E_(x, y) [ min_{|delta|_inf <= eps}  CE(f_theta(x + delta), y) ]

by alternating a few SGD steps on a source model trained on ``x + delta`` with signed-gradient
steps that *lower* each image's loss, until the source model fits the perturbed set almost
perfectly. The noise is then an easy shortcut from image to label, so a pirate trained on the
protected images learns the noise instead of the image content.
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
    """Sample-wise error-minimising noise within an L-inf ball (unlearnable examples).

    :meth:`fit` computes one perturbation ``delta`` (float, (N, C, H, W)) per training image;
    :meth:`protect` returns those same images with their noise added and stored as 8 bits, so
    it must be given exactly the images (and labels), in the same order, that ``fit`` saw.

    Each round of ``fit`` (Huang et al. 2021, Algorithm "sample-wise min-min"):

    1. ``train_steps`` SGD steps of a source model on random batches of ``x + delta``;
    2. for every image, ``pgd_steps`` steps ``delta <- P(delta - a * sign(grad CE))`` with the
       source model frozen in eval mode, ``P`` projecting onto ``|delta|_inf <= eps`` and
       ``x + delta`` in [0, 1];
    3. stop once the source model's accuracy on ``x + delta`` exceeds ``stop_acc``.

    The source model is trained from scratch here, so ``surrogates`` are accepted and ignored.

    Args:
        surrogates: ignored.
        device: where the source model and the noise updates run.
        batch_size: images per training and noise-update batch.
        seed: seed of the source model's initialisation, the initial noise and the batch
            order (CPU generators, so the noise does not depend on the device's generator).
        eps: L-inf radius in 8-bit levels (8 means 8/255), >= 0.
        step_size: noise step in 8-bit levels; default ``eps / 10`` (0.8 for eps 8, as in
            the paper's CIFAR-10 setting).
        pgd_steps: noise steps per image per round, >= 1.
        train_steps: source-model SGD steps per round, >= 0.
        rounds: maximum number of rounds, >= 1.
        stop_acc: stop once the source accuracy on ``x + delta`` exceeds this, in [0, 1].
        arch: source-model architecture for
            :func:`raeg_pl.models.classifier.create_classifier`.
        num_classes: classes of the source model; default ``max(labels) + 1`` at fit time.
        lr: SGD learning rate of the source model.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        amp: bf16 autocast for the source model (CUDA only; ignored on the CPU).
    """

    name = "unlearnable"
    reversible = False
    # The noise exists only for the fitted images: there is none for a test split.
    protects_unseen = False

    def __init__(
        self,
        surrogates: list[nn.Module] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        seed: int = 0,
        eps: float = 8.0,
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
    ) -> None:
        # The source model is trained here; surrogates play no part.
        super().__init__(surrogates=None, device=device, batch_size=batch_size, seed=seed)
        if eps < 0:
            raise ValueError(f"eps must be >= 0 (8-bit levels), got {eps}")
        if pgd_steps < 1 or train_steps < 0 or rounds < 1:
            raise ValueError(
                "need pgd_steps >= 1, train_steps >= 0 and rounds >= 1, got "
                f"{pgd_steps}, {train_steps}, {rounds}"
            )
        if not 0.0 <= stop_acc <= 1.0:
            raise ValueError(f"stop_acc must be in [0, 1], got {stop_acc}")
        if step_size is None:
            step_size = eps / 10.0
        if step_size < 0 or (eps > 0 and step_size == 0):
            raise ValueError(f"step_size must be > 0 (8-bit levels), got {step_size}")
        self.eps = float(eps)
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
        self.delta: torch.Tensor | None = None
        self.rounds_run: int | None = None
        self.source_acc: float | None = None
        self.source_acc_history: list[float] = []
        self._fitted_on: tuple[tuple[int, ...], str] | None = None

    def fit(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Computes the error-minimising noise of every image.

        Args:
            images: (N, C, H, W) uint8, the images to protect later.
            labels: (N,) int64 class indices.

        Sets ``delta`` ((N, C, H, W) float32 on the CPU, in ``[-eps/255, eps/255]`` with
        ``x + delta`` in [0, 1]), ``rounds_run``, ``source_acc`` and ``source_acc_history``.
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

        eps = self.eps / 255.0
        delta = torch.rand(images.shape, generator=generator).mul_(2.0).sub_(1.0).mul_(eps)
        for sl in batches(len(images), self.batch_size):
            x = from_uint8(images[sl])
            delta[sl] = (x + delta[sl]).clamp_(0.0, 1.0).sub_(x)
        train_batches = self._shuffled_batches(len(images), generator)

        self.source_acc_history = []
        for round_index in range(self.rounds):
            model.train()
            for _ in range(self.train_steps):
                idx = next(train_batches)
                x = (from_uint8(images[idx]) + delta[idx]).to(self.device)
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
                d = self._minimise_noise(model, x, y, delta[sl].to(self.device))
                delta[sl] = d.cpu()
                with torch.no_grad(), bf16_autocast(self.device, self.amp):
                    correct += int((model(x + d).argmax(dim=1) == y).sum())
            acc = correct / len(images)
            self.source_acc_history.append(acc)
            self.rounds_run = round_index + 1
            self.source_acc = acc
            if acc > self.stop_acc:
                break

        self.delta = delta
        self._fitted_on = _fingerprint(images, labels)

    def _shuffled_batches(self, n: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """Endless random batches of indices: a fresh permutation of ``range(n)`` per epoch."""
        while True:
            order = torch.randperm(n, generator=generator)
            for sl in batches(n, self.batch_size):
                yield order[sl]

    def _minimise_noise(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor
    ) -> torch.Tensor:
        """``pgd_steps`` signed-gradient steps that lower ``CE(model(x + delta), y)`` (PGD descent).

        Args:
            model: the frozen (eval-mode) source model.
            x: (B, C, H, W) float in [0, 1].
            y: (B,) int64 labels.
            delta: (B, C, H, W) float start noise.

        Returns:
            (B, C, H, W) noise with ``|delta| <= eps/255`` and ``x + delta`` in [0, 1].
        """

        def loss_fn(adv: torch.Tensor) -> torch.Tensor:
            with bf16_autocast(self.device, self.amp):
                return F.cross_entropy(model(adv).float(), y, reduction="sum")

        adv = pgd_linf(
            x,
            loss_fn,
            eps=self.eps / 255.0,
            step_size=self.step_size / 255.0,
            steps=self.pgd_steps,
            direction=-1,
            start=x + delta,
        )
        return adv - x

    def protect(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The fitted images with their error-minimising noise, stored as 8 bits.

        Args:
            images: (N, C, H, W) uint8, exactly the images passed to :meth:`fit`, in order.
            labels: (N,) int64, exactly the labels passed to :meth:`fit`.

        Returns:
            (N, C, H, W) uint8 on the CPU, each value within ``floor(eps)`` levels of the input.

        Raises:
            RuntimeError: if :meth:`fit` has not been called.
            ValueError: if ``images``/``labels`` are not the ones ``fit`` saw: the noise is
                per image, so there is none for other images (e.g. a test split).
        """
        check_images_labels(images, labels)
        if self.delta is None or self._fitted_on is None:
            raise RuntimeError("unlearnable: call fit(images, labels) before protect()")
        if _fingerprint(images, labels) != self._fitted_on:
            raise ValueError(
                "unlearnable: protect() got images/labels that differ from those passed to "
                f"fit() (fit saw {self._fitted_on[0]}, got {tuple(images.shape)}): sample-wise "
                "error-minimising noise exists only for the fitted images, in the same order"
            )
        out = torch.empty_like(images, device="cpu")
        for sl in batches(len(images), self.batch_size):
            x = from_uint8(images[sl]) + self.delta[sl]
            out[sl] = store_within_eps(x, images[sl].cpu(), self.eps)
        return out

    def config(self) -> dict[str, Any]:
        """Name, every parameter, and the rounds run and final source accuracy of ``fit``."""
        return {
            "name": self.name,
            "eps": self.eps,
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
        }
