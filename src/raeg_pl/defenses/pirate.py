"""Pirate defences: what a pirate changes about its training to learn from protected images.

A *pirate defence* is written as a spec string, like an image defence (``name[:k=v,...]``),
and says which of three things it changes:

* **the data, once** (``kind == "image"``): an image defence of
  :mod:`raeg_pl.defenses.registry` (``"jpeg:q=10"``, ``"gray"``...) in its real 8-bit form,
  applied to every training image before training;
* **the data, with labels or leaked pairs** (``kind == "labelled"`` or ``"paired"``):

  - ``classpattern[:sigma=S]``: class-pattern removal. Each class's pattern is estimated
    from the protected training images and their labels alone, as the high-pass of the
    class mean (class mean minus its Gaussian blur of std ``S`` pixels), and subtracted from
    every image of that class; the result is stored as 8-bit
    (:func:`remove_class_patterns_uint8`; batch form :func:`class_pattern_removal`);
  - ``inverse[:k=K,steps=N]``: a learned inverse. The pirate holds ``K`` leaked
    clean/protected pairs (a seeded choice among its training images), fits a small
    residual CNN (:class:`InverseNet`) to them with MSE for ``N`` steps, applies it to every
    protected training image and stores the result as 8-bit (:func:`learned_inverse_uint8`);

* **the training loop** (``kind == "training"``): ``adv_train[:eps=E,steps=N]``, PGD
  adversarial training at L-inf radius ``E/255`` (Madry et al., ICLR 2018), and ``ueraser``,
  UEraser-style strong augmentation of every training batch with mixup/cutmix soft labels
  (:func:`raeg_pl.data.augment.ueraser`; Qin et al., "Learning the unlearnable: adversarial
  augmentations suppress unlearnable example attacks", 2023). Both are options of
  :class:`~raeg_pl.lit.classifier.ClassifierLitModule` (:attr:`PirateDefense.model`).

``none`` trains on the images as given. :func:`parse_pirate_defense` turns a spec into a
:class:`PirateDefense`; ``str`` of it is the canonical spec (every parameter written out)
and parses back to an equal object.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from raeg_pl.defenses.ops import gaussian_blur
from raeg_pl.defenses.registry import Param, get_defense
from raeg_pl.utils.quantize import from_uint8, to_uint8

__all__ = [
    "CLASSPATTERN_SIGMA",
    "INVERSE_STEPS",
    "PIRATE_DEFENSES",
    "InverseNet",
    "PirateDefense",
    "class_pattern_removal",
    "class_patterns",
    "fit_inverse",
    "apply_inverse_uint8",
    "learned_inverse_uint8",
    "parse_pirate_defense",
    "remove_class_patterns_uint8",
    "subtract_class_patterns",
]

#: Default std (pixels) of the blur whose residual is the class pattern. The mean of many
#: natural images of one class is smooth (a colour layout), so its high-pass is small: on
#: 9,500 CIFAR-10 training images it is 0.9 / 2.1 / 3.2 levels RMS at sigma 1 / 2 / 3, the
#: content the removal costs a clean image. Shortcut patterns (class-wise and
#: error-minimising noise, pixel or patch shortcuts, an invertible network's residual) sit
#: at 1-3 px scales: a class-wise +-8/255 uniform noise keeps a correlation of 0.43 / 0.08 /
#: 0.03 with what remains after removal at sigma 1 / 2 / 3. Sigma 2 removes nearly all of
#: such a pattern for about 2 levels of content. (Related pirates estimate class-wise
#: directions linearly too: the orthogonal projection of Sandoval-Segura et al., "What can
#: we learn from unlearnable datasets?", NeurIPS 2023.)
CLASSPATTERN_SIGMA = 2.0
#: Default step budget of the learned inverse: 300 Adam steps of 32 pairs. Fitting them and
#: restoring 9,500 images costs about a quarter of a quick-profile pirate's training on the
#: same 2-core CPU (benchmarks/bench_pirate_defenses.py). Already 100 steps on 100 pairs
#: lift 8,500 held-out CIFAR-10 images under a class-wise pattern plus blur from 27.5 to
#: 33.3 dB PSNR.
INVERSE_STEPS = 300

_PARAMS: dict[str, tuple[Param, ...]] = {
    "adv_train": (
        Param(
            "eps", float, 8.0, low=0.0, low_inclusive=False, high=255.0, doc="L-inf radius x/255"
        ),
        Param("steps", int, 5, low=1, high=1000, doc="PGD steps per batch"),
    ),
    "classpattern": (
        Param(
            "sigma",
            float,
            CLASSPATTERN_SIGMA,
            low=0.0,
            low_inclusive=False,
            high=16.0,
            doc="std (pixels) of the blur whose residual is the pattern",
        ),
    ),
    "inverse": (
        Param("k", int, 100, low=1, doc="leaked clean/protected pairs"),
        Param("steps", int, INVERSE_STEPS, low=1, high=100_000, doc="training steps"),
        Param(
            "restarts",
            int,
            1,
            low=1,
            high=32,
            doc="initialisations tried for a tenth of the steps each; the best on the pairs goes on",
        ),
    ),
    "ueraser": (),
}
_KINDS = {
    "adv_train": "training",
    "classpattern": "labelled",
    "inverse": "paired",
    "ueraser": "training",
}
#: The pirate-only defences (beyond every image defence of the registry) and their kinds.
PIRATE_DEFENSES = MappingProxyType(dict(_KINDS))
_USAGE = (
    "pirate defences: none, any image defence (jpeg:q=Q, gray, blur:sigma=S, ...), "
    "adv_train:eps=E,steps=N, classpattern:sigma=S, inverse:k=K[,steps=N,restarts=R], ueraser"
)
#: Parameters added after grids had recorded canonical specs in their stage recipes: at these
#: defaults they are left out of the canonical spec, so those recipes (and their cells) stay
#: valid; the behaviour at the default is the one those runs had.
_LATER_PARAMS: dict[str, dict[str, int | float]] = {"inverse": {"restarts": 1}}


def _fmt(value: int | float) -> str:
    if isinstance(value, int):
        return str(value)
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


@dataclass(frozen=True)
class PirateDefense:
    """A parsed pirate defence (see the module docstring).

    Attributes:
        name: ``"none"``, a pirate-only name (:data:`PIRATE_DEFENSES`) or an image
            defence's canonical registry name.
        params: every parameter, typed and validated (read-only).
    """

    name: str
    params: Mapping[str, int | float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    @property
    def kind(self) -> str:
        """``"none"``, ``"image"``, ``"labelled"``, ``"paired"`` or ``"training"``."""
        if self.name == "none":
            return "none"
        return _KINDS.get(self.name, "image")

    @property
    def spec(self) -> str:
        """Canonical spec, every parameter written out (``"inverse:k=100,steps=300"``; a
        parameter of :data:`_LATER_PARAMS` only when it is not at its default)."""
        if self.kind == "image":
            return get_defense(self.name + "".join(self._args())).spec
        return self.name + "".join(self._args())

    def _args(self) -> list[str]:
        later = _LATER_PARAMS.get(self.name, {})
        shown = {k: v for k, v in self.params.items() if k not in later or later[k] != v}
        if not shown:
            return []
        return [":" + ",".join(f"{k}={_fmt(v)}" for k, v in shown.items())]

    @property
    def data(self) -> str | None:
        """Spec the data module applies once to the pirate's images (None: none)."""
        return self.spec if self.kind in ("image", "labelled", "paired") else None

    @property
    def model(self) -> dict:
        """:class:`~raeg_pl.lit.classifier.ClassifierLitModule` overrides (training loop)."""
        if self.name == "adv_train":
            return {
                "adv_train_eps": float(self.params["eps"]),
                "adv_train_steps": self.params["steps"],
            }
        if self.name == "ueraser":
            return {"train_augment": "ueraser"}
        return {}

    def __str__(self) -> str:
        return self.spec


def parse_pirate_defense(spec: str) -> PirateDefense:
    """A :class:`PirateDefense` from a spec string.

    Args:
        spec: ``"none"``, an image defence spec, or ``adv_train[:eps=E,steps=N]``,
            ``classpattern[:sigma=S]``, ``inverse[:k=K,steps=N,restarts=R]``, ``ueraser``; values may be
            positional in parameter order (``"inverse:1000"``).

    Returns:
        The validated defence, defaults filled in.

    Raises:
        ValueError: naming the spec, for an unknown name (listing the pirate defences and the
            image defences) or a bad, unknown or repeated parameter (listing the valid ones).
    """
    if not isinstance(spec, str):
        raise ValueError(f"pirate defence must be a string, got {type(spec).__name__}: {spec!r}")
    text = spec.strip()
    name, sep, rest = text.partition(":")
    name = name.strip().lower()
    if name == "none" and not sep:
        return PirateDefense("none")
    if name not in _PARAMS:
        try:
            image = get_defense(text)
        except ValueError as e:
            raise ValueError(f"pirate defence {spec!r}: {e}; {_USAGE}") from None
        return PirateDefense(image.name, dict(image.params))
    params = _PARAMS[name]
    valid = (
        f"valid parameters of {name!r}: " + "; ".join(p.describe() for p in params)
        if params
        else f"{name!r} takes no parameters"
    )
    values: dict[str, int | float] = {}
    keyword = False
    if sep:
        args = [a.strip() for a in rest.split(",")]
        if any(not a for a in args):
            raise ValueError(f"pirate defence {spec!r}: empty argument; {valid}")
        for i, arg in enumerate(args):
            key, eq, value = arg.partition("=")
            keyword = keyword or bool(eq)
            if not eq:
                if keyword or i >= len(params):
                    raise ValueError(f"pirate defence {spec!r}: unexpected value {arg!r}; {valid}")
                key, value = params[i].name, arg
            param = next((p for p in params if key.strip().lower() in (p.name, *p.aliases)), None)
            if param is None:
                raise ValueError(f"pirate defence {spec!r}: unknown parameter {key!r}; {valid}")
            if param.name in values:
                raise ValueError(f"pirate defence {spec!r}: {param.name!r} given twice; {valid}")
            try:
                values[param.name] = param.parse(value)
            except ValueError as e:
                raise ValueError(
                    f"pirate defence {spec!r}: bad {param.name!r}: {e}; {valid}"
                ) from None
    return PirateDefense(name, {p.name: values.get(p.name, p.default) for p in params})


# ----------------------------------------------------------------------------------------------
# Class-pattern removal
# ----------------------------------------------------------------------------------------------


def class_patterns(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, sigma: float = CLASSPATTERN_SIGMA
) -> torch.Tensor:
    """Each class's pattern: the high-pass of its mean image (mean minus its Gaussian blur).

    Linear in ``images`` (a class mean, then a fixed convolution), hence differentiable.

    Args:
        images: (N, C, H, W) float, nominally in [0, 1].
        labels: (N,) int64 class labels in [0, num_classes).
        num_classes: number of classes K.
        sigma: std of the Gaussian blur in pixels (reflect border).

    Returns:
        (K, C, H, W) float patterns, zero for a class without images, values in about
        [-1, 1].
    """
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"class_patterns: images (N, C, H, W) and labels (N,), got {tuple(images.shape)} "
            f"and {tuple(labels.shape)}"
        )
    onehot = F.one_hot(labels.long(), num_classes).to(images.dtype)  # (N, K)
    counts = onehot.sum(0).clamp_min(1)
    means = torch.einsum("nk,nchw->kchw", onehot, images) / counts[:, None, None, None]
    return means - gaussian_blur(means, sigma)


def subtract_class_patterns(
    images: torch.Tensor, labels: torch.Tensor, patterns: torch.Tensor
) -> torch.Tensor:
    """Images minus their class's pattern (no clamping, no rounding; linear).

    Args:
        images: (B, C, H, W) float in [0, 1].
        labels: (B,) int64.
        patterns: (K, C, H, W) from :func:`class_patterns`.

    Returns:
        (B, C, H, W) float, nominally in [0, 1] (may leave it slightly).
    """
    return images - patterns[labels.long()]


def class_pattern_removal(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, sigma: float = CLASSPATTERN_SIGMA
) -> torch.Tensor:
    """Differentiable class-pattern removal of a batch, patterns estimated from the batch.

    A linear operation of the batch given its labels: what a protector's training can
    differentiate through to anticipate the pirate of ``classpattern``. On the full training
    set, before clamping and rounding, it is the pirate's real operation
    (:func:`remove_class_patterns_uint8`).

    Args:
        images: (B, C, H, W) float in [0, 1].
        labels: (B,) int64 class labels.
        num_classes: number of classes.
        sigma: blur std in pixels (see :data:`CLASSPATTERN_SIGMA`).

    Returns:
        (B, C, H, W) float, gradients flow to ``images``.
    """
    return subtract_class_patterns(
        images, labels, class_patterns(images, labels, num_classes, sigma)
    )


def remove_class_patterns_uint8(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    sigma: float = CLASSPATTERN_SIGMA,
    fit_indices: torch.Tensor | None = None,
    batch_size: int = 2048,
) -> torch.Tensor:
    """The pirate's class-pattern removal of a whole training set, stored as 8-bit.

    Args:
        images: (N, C, H, W) uint8.
        labels: (N,) int64.
        num_classes: number of classes.
        sigma: blur std in pixels.
        fit_indices: the images the patterns are estimated from (the pirate's training
            images; None: all); the removal applies to every image.
        batch_size: images converted to float at a time.

    Returns:
        (N, C, H, W) uint8: ``to_uint8(image / 255 - pattern[label])``.
    """
    fit = torch.arange(len(images)) if fit_indices is None else fit_indices
    sums = torch.zeros(num_classes, *images.shape[1:], dtype=torch.float64)
    for i in range(0, len(fit), batch_size):
        idx = fit[i : i + batch_size]
        sums.index_add_(0, labels[idx].long(), from_uint8(images[idx], torch.float64))
    counts = torch.bincount(labels[fit].long(), minlength=num_classes).clamp_min(1)
    means = (sums / counts[:, None, None, None]).float()
    patterns = means - gaussian_blur(means, sigma)
    out = torch.empty_like(images)
    for i in range(0, len(images), batch_size):
        x = from_uint8(images[i : i + batch_size])
        out[i : i + batch_size] = to_uint8(
            subtract_class_patterns(x, labels[i : i + batch_size], patterns)
        )
    return out


# ----------------------------------------------------------------------------------------------
# Learned inverse
# ----------------------------------------------------------------------------------------------


class InverseNet(nn.Module):
    """A small label-aware residual CNN mapping protected images to their originals' estimates.

    ``x + f(x, y) + offset[y]``: ``f`` is a stack of ``depth`` 3x3 convolutions (ReLU between)
    whose first hidden layer gets a learned per-class bias, and ``offset`` a learned
    per-class image; the pirate knows its labels, and a label-conditioned protector's
    residual depends on them. The last convolution and both class terms start at zero, so
    the untrained network is the identity.

    Args:
        channels: image channels C.
        num_classes: classes K (0: no class terms).
        image_size: (H, W) of the images (the size of the class offsets).
        width: hidden channels.
        depth: convolutions (>= 2).
    """

    def __init__(
        self,
        channels: int = 3,
        num_classes: int = 0,
        image_size: tuple[int, int] = (32, 32),
        width: int = 16,
        depth: int = 3,
    ) -> None:
        super().__init__()
        if depth < 2:
            raise ValueError(f"InverseNet needs depth >= 2, got {depth}")
        self.first = nn.Conv2d(channels, width, 3, padding=1)
        layers: list[nn.Module] = [nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        last = nn.Conv2d(width, channels, 3, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.rest = nn.Sequential(*layers, last)
        self.num_classes = num_classes
        k = max(num_classes, 1)
        self.class_bias = nn.Parameter(torch.zeros(k, width, 1, 1))
        self.class_offset = nn.Parameter(torch.zeros(k, channels, *image_size))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) float in [0, 1] and (B,) labels -> (B, C, H, W) unclamped estimates."""
        h = self.first(x)
        if self.num_classes:
            if labels is None:
                raise ValueError("InverseNet with classes needs the labels")
            h = h + self.class_bias[labels]
            return x + self.rest(h) + self.class_offset[labels]
        return x + self.rest(h)


def fit_inverse(
    protected: torch.Tensor,
    clean: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    steps: int = INVERSE_STEPS,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    restarts: int = 1,
) -> InverseNet:
    """Fits an :class:`InverseNet` to leaked pairs with MSE (Adam, cosine-decayed rate).

    The fit depends on its initialisation: on `full`'s CIFAR-10 export one initialisation
    stalls at 35.1 dB where others reach 38-39 dB with the same pairs. With ``restarts`` R > 1
    the pirate tries R initialisations for the first tenth of the steps each, keeps the one
    with the lowest MSE on its pairs (what it can measure) and trains it on to ``steps``;
    R = 1 is one fit, as before the parameter existed.

    Cost: ``steps`` (plus ``(R - 1) * steps // 10``) forward/backward passes of
    ``batch_size`` 32x32 images through three width-16 convolutions (about 0.6 GFLOP a step);
    see :data:`INVERSE_STEPS` for the default budget's cost.

    Args:
        protected: (K, C, H, W) uint8 protected images.
        clean: (K, C, H, W) uint8 originals, index-aligned.
        labels: (K,) int64 labels of the pairs.
        num_classes: number of classes.
        steps: optimiser steps.
        batch_size: pairs per step (all K when fewer).
        lr: peak Adam learning rate.
        seed: seed of the initialisation and of the batch draws (restart r uses seed + 7919 r).
        restarts: initialisations tried.

    Returns:
        The fitted network, in eval mode, on the pairs' device; its ``restart_pair_mse`` lists each
        initialisation's MSE on the pairs after the trial steps (empty when R = 1).
    """
    if protected.shape != clean.shape or protected.ndim != 4 or len(labels) != len(clean):
        raise ValueError(
            f"fit_inverse: pairs of equal (K, C, H, W) shape and K labels needed, got "
            f"{tuple(protected.shape)}, {tuple(clean.shape)} and {tuple(labels.shape)}"
        )
    if restarts < 1:
        raise ValueError(f"fit_inverse: restarts must be >= 1, got {restarts}")
    x_all, y_all = from_uint8(protected), from_uint8(clean)
    b = min(batch_size, len(x_all))

    def start(r: int):
        gen = torch.Generator().manual_seed(seed + 7919 * r)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 7919 * r)
            net = InverseNet(protected.shape[1], num_classes, tuple(protected.shape[-2:]))
        net.to(protected.device)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        return net, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps), gen

    def train(fit, n: int) -> None:
        net, opt, sched, gen = fit
        net.train()
        for _ in range(n):
            idx = torch.randint(len(x_all), (b,), generator=gen)
            loss = F.mse_loss(net(x_all[idx], labels[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    def pair_mse(net: InverseNet) -> float:
        net.eval()
        with torch.no_grad():
            return (
                sum(
                    F.mse_loss(
                        net(x_all[i : i + 512], labels[i : i + 512]),
                        y_all[i : i + 512],
                        reduction="sum",
                    ).item()
                    for i in range(0, len(x_all), 512)
                )
                / y_all.numel()
            )

    trial = steps if restarts == 1 else max(1, steps // 10)
    fits, scores = [], []
    for r in range(restarts):
        fit = start(r)
        train(fit, trial)
        fits.append(fit)
        if restarts > 1:
            scores.append(pair_mse(fit[0]))
    best = fits[min(range(restarts), key=lambda r: scores[r]) if restarts > 1 else 0]
    train(best, steps - trial)
    net = best[0].eval()
    net.restart_pair_mse = scores
    return net


def apply_inverse_uint8(
    net: InverseNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512
) -> torch.Tensor:
    """Applies a fitted inverse to uint8 images (N, C, H, W) with labels (N,); returns uint8."""
    out = torch.empty_like(images)
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = from_uint8(images[i : i + batch_size])
            out[i : i + batch_size] = to_uint8(net(x, labels[i : i + batch_size]))
    return out


def learned_inverse_uint8(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    pair_indices: torch.Tensor,
    clean_pairs: torch.Tensor,
    steps: int = INVERSE_STEPS,
    seed: int = 0,
    restarts: int = 1,
) -> tuple[torch.Tensor, dict]:
    """The pirate's learned inverse: fit on leaked pairs, apply to every image, store 8-bit.

    Args:
        images: (N, C, H, W) uint8 protected training images.
        labels: (N,) int64 their labels.
        num_classes: number of classes.
        pair_indices: (K,) indices into ``images`` of the leaked pairs.
        clean_pairs: (K, C, H, W) uint8 originals of ``images[pair_indices]``.
        steps: training steps of :func:`fit_inverse`.
        seed: seed of the fit.
        restarts: initialisations tried (:func:`fit_inverse`).

    Returns:
        ``(restored, stats)``: (N, C, H, W) uint8 and ``{"pairs", "steps", "fit_seconds",
        "pair_mse_before", "pair_mse_after"}`` (MSE on the pairs, [0, 1] units), with
        ``"restarts"`` and ``"restart_pair_mse"`` when ``restarts`` > 1.
    """
    protected, pair_labels = images[pair_indices], labels[pair_indices]
    t0 = time.perf_counter()
    net = fit_inverse(
        protected,
        clean_pairs,
        pair_labels,
        num_classes,
        steps=steps,
        seed=seed,
        restarts=restarts,
    )
    fit_s = time.perf_counter() - t0
    restored = apply_inverse_uint8(net, images, labels)
    y = from_uint8(clean_pairs)
    stats = {
        "pairs": len(pair_indices),
        "steps": steps,
        "fit_seconds": round(fit_s, 2),
        "pair_mse_before": F.mse_loss(from_uint8(protected), y).item(),
        "pair_mse_after": F.mse_loss(from_uint8(restored[pair_indices]), y).item(),
    }
    if restarts > 1:
        stats.update(restarts=restarts, restart_pair_mse=net.restart_pair_mse)
    return restored, stats
