"""RAEG as a protection method: a trained invertible protector applied to 8-bit images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from raeg_pl.methods.base import ProtectionMethod, batches


class RAEGMethod(ProtectionMethod):
    """The reversible adversarial example generator, loaded from a protector checkpoint.

    Args:
        checkpoint: a ``ProtectorLitModule`` checkpoint (or an exported key file's
            checkpoint) that :func:`raeg_pl.io.keyfile.load_protector_checkpoint` reads.
        surrogates, device, batch_size, seed: see :class:`ProtectionMethod` (RAEG was trained
            against its surrogates already; they are not used here).
    """

    name = "raeg"
    reversible = True

    def __init__(self, checkpoint: str | Path, **common: Any) -> None:
        super().__init__(**common)
        from raeg_pl.io.keyfile import load_protector_checkpoint

        self.checkpoint = Path(checkpoint)
        self.net = load_protector_checkpoint(self.checkpoint).to(self.device).eval()

    def _apply(self, fn, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        from raeg_pl.metrics import to_uint8

        if self.net.conditional and labels is None:
            raise ValueError(
                f"the protector of {self.checkpoint} is conditioned on class labels: "
                "protecting and recovering need the images' labels"
            )
        out = torch.empty_like(images)
        with torch.no_grad():
            for s in batches(len(images), self.batch_size):
                x = images[s].to(self.device).float() / 255
                y = None if labels is None else labels[s].to(self.device)
                out[s] = to_uint8(fn(x, y)).cpu()
        return out

    def protect(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._apply(self.net, images, labels)

    def recover(self, protected: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self._apply(self.net.inverse, protected, labels)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "checkpoint": str(self.checkpoint),
            "protector_fingerprint": self.net.fingerprint(),
            "protector_config": self.net.config,
        }
