"""The interface every protection method implements (RAEG and the baselines).

A method turns the owner's training images into protected images, all as 8-bit tensors, so
every method is exported, stored and measured the same way (:mod:`raeg_pl.io.protected`)
and every table compares like with like. Reversible methods also restore them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ProtectionMethod:
    """A way of protecting an image dataset.

    Subclasses set ``name`` and ``reversible`` and implement :meth:`protect` (and
    :meth:`recover` when reversible). Images are always (N, C, H, W) uint8 and labels (N,)
    int64 on the CPU; methods batch internally and may run on ``device``.

    Args:
        surrogates: frozen classifiers (eval mode, logits from [0, 1] float images) that
            attack-based methods target. Methods that need none ignore them.
        device: where the heavy work runs.
        batch_size: images per internal batch.
        seed: seed of any randomness (random starts, label permutation, ...).
    """

    name: str = "method"
    reversible: bool = False
    # False for methods that only exist for the images they were fitted on (sample-wise
    # optimised noise): they have no inference-time figures on unseen test images.
    protects_unseen: bool = True

    def __init__(
        self,
        surrogates: list[nn.Module] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        seed: int = 0,
    ) -> None:
        self.surrogates = list(surrogates or [])
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.seed = int(seed)

    def frozen_surrogates(self) -> list[nn.Module]:
        """The surrogates on ``device`` in eval mode without parameter gradients."""
        if not self.surrogates:
            raise ValueError(f"{self.name}: needs at least one surrogate classifier, got none")
        for model in self.surrogates:
            model.eval().to(self.device)
            for p in model.parameters():
                p.requires_grad_(False)
        return self.surrogates

    def surrogate_num_classes(self, num_classes: int | None = None) -> int | None:
        """``num_classes`` if given, else the surrogates' shared ``num_classes`` attribute."""
        if num_classes is None:
            found = {getattr(m, "num_classes", None) for m in self.surrogates} - {None}
            if len(found) > 1:
                raise ValueError(f"surrogates disagree on num_classes: {sorted(found)}")
            num_classes = found.pop() if found else None
        return None if num_classes is None else int(num_classes)

    def fit(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Learns whatever the method needs from the whole training set (default: nothing)."""

    def protect(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Protected copies (N, C, H, W) uint8 of ``images`` (N, C, H, W) uint8."""
        raise NotImplementedError

    def recover(self, protected: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Restored images (N, C, H, W) uint8 from stored protected images (reversible only).

        ``labels`` (N,): the class labels, which a label-conditioned method needs (an
        authorised user reads them from the class folders of the protected dataset)."""
        raise NotImplementedError(f"{self.name} is not reversible")

    def config(self) -> dict[str, Any]:
        """The parameters that identify this method's output (written to the manifest)."""
        return {"name": self.name}


def batches(n: int, size: int):
    """``slice`` objects covering ``range(n)`` in chunks of ``size``."""
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))
