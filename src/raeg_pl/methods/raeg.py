"""RAEG as a protection method: a trained invertible protector applied to 8-bit images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from raeg_pl.methods.base import ProtectionMethod


class RAEGMethod(ProtectionMethod):
    """The reversible adversarial example generator, loaded from a protector checkpoint.

    Args:
        checkpoint: a ``ProtectorLitModule`` checkpoint (or an exported key file's
            checkpoint) that :func:`raeg_pl.io.keyfile.load_protector_checkpoint` reads.
        refine_steps: restore-aware rounding of the stored images
            (:func:`raeg_pl.io.apply.restore_aware_rounding`; 0: plain rounding). Restoring
            is unchanged; the recovered images come closer to the originals.
        surrogates, device, batch_size, seed: see :class:`ProtectionMethod` (RAEG was trained
            against its surrogates already; they are not used here).
    """

    name = "raeg"
    reversible = True

    def __init__(self, checkpoint: str | Path, refine_steps: int = 0, **common: Any) -> None:
        super().__init__(**common)
        from raeg_pl.io.keyfile import load_protector_checkpoint

        if int(refine_steps) < 0:
            raise ValueError(f"refine_steps must be >= 0, got {refine_steps}")
        self.refine_steps = int(refine_steps)
        self.checkpoint = Path(checkpoint)
        self.net = load_protector_checkpoint(self.checkpoint).to(self.device).eval()

    def _apply(
        self, images: torch.Tensor, labels: torch.Tensor | None, inverse: bool
    ) -> torch.Tensor:
        from raeg_pl.io.apply import apply_protector

        if self.net.conditional and labels is None:
            raise ValueError(
                f"the protector of {self.checkpoint} is conditioned on class labels: "
                "protecting and recovering need the images' labels"
            )
        return apply_protector(
            self.net,
            images,
            labels,
            inverse=inverse,
            batch_size=self.batch_size,
            device=self.device,
            refine_steps=0 if inverse else self.refine_steps,
        )

    def protect(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._apply(images, labels, inverse=False)

    def recover(self, protected: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self._apply(protected, labels, inverse=True)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "checkpoint": str(self.checkpoint),
            "protector_fingerprint": self.net.fingerprint(),
            "protector_config": self.net.config,
            **({"refine_steps": self.refine_steps} if self.refine_steps else {}),
        }
