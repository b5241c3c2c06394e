"""A pirate that learns from the protected batch, unrolled: the accuracy a model trained on
the protected images reaches on clean ones, as a differentiable loss of those images.

The adversarial term asks a frozen surrogate to misread the protected images; what the
evaluation measures is a model *trained* on them. In the spirit of MetaPoison (Huang et al.,
NeurIPS 2020) and Witches' Brew (Geiping et al., ICLR 2021), this term simulates the pirate:
a small convolutional network takes ``steps`` SGD steps on protected images with their true
labels, keeping the graph of every step, and is then scored on *other*, clean images of the
same classes; the protector minimises that score (the capped C&W margin of the true class),
so that what a model learns from the protected images fails on real data.

The network is written functionally (a list of parameter tensors), so the unrolled steps are
ordinary autograd with ``create_graph=True``; :class:`UnrolledPirate` keeps the weights
between protector steps, trains them one plain SGD step per protector step on the (detached)
protected batch, as a pirate learning alongside, and draws new weights every ``reset`` steps,
so the term sees pirates at every stage of training (MetaPoison's staggered ensemble).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from raeg_pl.losses.adversarial import untargeted_adversarial_loss


def init_pirate_params(
    in_channels: int,
    num_classes: int,
    width: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """Freshly initialised weights of the small pirate :func:`pirate_forward` runs.

    Three 3x3 convolutions (``width``, ``2 width``, ``4 width`` channels; He-normal weights,
    zero biases) and a linear classifier (LeCun-normal), drawn from ``generator`` on the CPU
    so that the same seed gives the same pirate on every device.

    Returns:
        ``[w1, b1, w2, b2, w3, b3, w_fc, b_fc]``, float32 on ``device``, leaves that require
        gradients.
    """
    if in_channels < 1 or num_classes < 2 or width < 1:
        raise ValueError(
            f"pirate needs in_channels >= 1, num_classes >= 2, width >= 1; got "
            f"{in_channels}, {num_classes}, {width}"
        )
    shapes = [(width, in_channels), (2 * width, width), (4 * width, 2 * width)]
    params = []
    for out_c, in_c in shapes:
        w = torch.randn(out_c, in_c, 3, 3, generator=generator) * math.sqrt(2.0 / (9 * in_c))
        params += [w, torch.zeros(out_c)]
    fc = torch.randn(num_classes, 4 * width, generator=generator) / math.sqrt(4 * width)
    params += [fc, torch.zeros(num_classes)]
    return [p.to(device).requires_grad_(True) for p in params]


def pirate_forward(params: list[torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Logits (B, K) of the small pirate with weights ``params`` on images (B, C, H, W) in [0, 1]."""
    w1, b1, w2, b2, w3, b3, w_fc, b_fc = params
    x = (images - 0.5) / 0.25
    x = F.max_pool2d(F.relu(F.conv2d(x, w1, b1, padding=1)), 2)
    x = F.max_pool2d(F.relu(F.conv2d(x, w2, b2, padding=1)), 2)
    x = F.relu(F.conv2d(x, w3, b3, padding=1)).mean(dim=(2, 3))
    return F.linear(x, w_fc, b_fc)


def sgd_step(
    params: list[torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    lr: float,
    create_graph: bool = False,
) -> list[torch.Tensor]:
    """The pirate's weights after one SGD step of size ``lr`` on ``CE(f(images), labels)``;
    with ``create_graph`` the step stays differentiable (in ``images`` and ``params``)."""
    loss = F.cross_entropy(pirate_forward(params, images), labels)
    grads = torch.autograd.grad(loss, params, create_graph=create_graph)
    return [p - lr * g for p, g in zip(params, grads, strict=True)]


def unrolled_pirate_loss(
    params: list[torch.Tensor],
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    eval_images: torch.Tensor,
    eval_labels: torch.Tensor,
    steps: int,
    lr: float,
    kappa: float = 5.0,
) -> torch.Tensor:
    """How well the pirate does on ``eval_images`` after ``steps`` SGD steps on ``train_images``.

    Each step is ``theta <- theta - lr * grad CE(f_theta(train_images), train_labels)`` with
    its graph kept, so the result is differentiable with respect to ``train_images`` (the
    protected images) through every step. Minimising the result makes what is learnt from
    ``train_images`` misclassify ``eval_images``.

    Args:
        params: the pirate's starting weights (:func:`init_pirate_params`); not modified.
        train_images: (B, C, H, W) in [0, 1], the images the pirate trains on.
        train_labels: (B,) their labels.
        eval_images: (B', C, H, W) in [0, 1], clean images the trained pirate is scored on.
        eval_labels: (B',) their labels.
        steps: SGD steps, >= 1.
        lr: SGD step size, > 0.
        kappa: cap of the C&W margin (:func:`~raeg_pl.losses.untargeted_adversarial_loss`).

    Returns:
        Scalar: the mean capped margin ``max(z_y - max_{j != y} z_j, -kappa)`` of the trained
        pirate on ``eval_images`` (lower: the pirate is more wrong on real data).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    theta = [p if p.requires_grad else p.detach().requires_grad_(True) for p in params]
    for _ in range(steps):
        theta = sgd_step(theta, train_images, train_labels, lr, create_graph=True)
    logits = pirate_forward(theta, eval_images)
    return untargeted_adversarial_loss(logits, eval_labels, kappa=kappa, kind="margin")


class UnrolledPirate:
    """The pirate of the unrolled term, learning alongside the protector.

    Args:
        in_channels, num_classes, width: the pirate's shape (:func:`init_pirate_params`).
        steps, lr: the unrolled SGD steps and their size (also the size of the step it
            takes on each protected batch).
        reset: new weights every ``reset`` calls of :meth:`loss`.
        seed: the weights after the ``n``-th reset are drawn with seed ``seed + n``, so DDP
            ranks start every stage from the same pirate.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int = 16,
        steps: int = 2,
        lr: float = 0.1,
        reset: int = 250,
        seed: int = 0,
    ) -> None:
        if steps < 1 or not lr > 0 or reset < 1 or width < 1:
            raise ValueError(
                f"unrolled pirate needs steps >= 1, lr > 0, reset >= 1, width >= 1; got "
                f"steps={steps}, lr={lr}, reset={reset}, width={width}"
            )
        self.in_channels, self.num_classes, self.width = in_channels, num_classes, width
        self.steps, self.lr, self.reset, self.seed = steps, lr, reset, seed
        self.calls = 0
        self.params: list[torch.Tensor] | None = None

    def _fresh(self, device: torch.device) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed + self.calls // self.reset)
        return init_pirate_params(self.in_channels, self.num_classes, self.width, g, device)

    def loss(
        self, protected: torch.Tensor, clean: torch.Tensor, labels: torch.Tensor, kappa: float
    ) -> torch.Tensor:
        """The unrolled term on a batch, then one training step of the pirate itself.

        The batch is halved: the pirate trains on the protected images of one half and is
        scored on the clean images of the other; the halves swap every call, so every image
        of the data set is, in turn, one the pirate learns from.

        Args:
            protected: (B, C, H, W) protected (stored, possibly defended) images, B >= 2.
            clean: (B, C, H, W) the same images before protection.
            labels: (B,) their labels.
            kappa: cap of the margin.

        Returns:
            Scalar :func:`unrolled_pirate_loss`, differentiable in ``protected``.
        """
        if len(protected) < 2:
            raise ValueError("the unrolled pirate needs batches of at least 2 images")
        if self.params is None or self.calls % self.reset == 0:
            self.params = self._fresh(protected.device)
        half = len(protected) // 2
        learn, score = slice(0, half), slice(half, None)
        if self.calls % 2:
            learn, score = slice(half, None), slice(0, half)
        self.calls += 1
        with torch.autocast(protected.device.type, enabled=False):
            protected, clean = protected.float(), clean.float()
            value = unrolled_pirate_loss(
                self.params,
                protected[learn],
                labels[learn],
                clean[score],
                labels[score],
                self.steps,
                self.lr,
                kappa,
            )
            # The pirate learns from the whole protected batch, as a pirate would.
            with torch.enable_grad():
                theta = [p.detach().requires_grad_(True) for p in self.params]
                stepped = sgd_step(theta, protected.detach(), labels, self.lr)
            self.params = [p.detach().requires_grad_(True) for p in stepped]
        return value
