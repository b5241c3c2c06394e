"""PSNR controller: adapts the fidelity weight so protected images sit at a target PSNR."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["PSNRController"]


class PSNRController:
    """Multiplicative controller that steers a loss weight (``l_img``) toward a target PSNR.

    Comparing protection methods is only fair at equal distortion (docs/raeg-method.md,
    section 3). After each measurement the controller smooths the PSNR with an exponential
    moving average and updates the weight as::

        error  = clip(target_psnr - ema_psnr, -max_error_db, max_error_db)
        weight = clip(weight * exp(rate * error), min_weight, max_weight)

    so the weight grows while images are too distorted (PSNR below target) and shrinks
    while they are cleaner than needed; the step is proportional to the error in dB, and the
    clip keeps one bad batch from moving it far. Errors within ``tolerance_db`` leave the
    weight unchanged. Non-finite measurements are skipped (NaN) or clamped (+inf, from
    identical images, to ``psnr_ceiling``) so the EMA stays finite.

    Args:
        weight: initial weight (the method's starting ``l_img`` is 1.2).
        target_psnr: target PSNR of protected vs original images, in dB.
        rate: gain per dB of error per update, > 0.
        min_weight: lower bound on the weight, > 0.
        max_weight: upper bound on the weight.
        ema_decay: EMA decay in [0, 1); 0 uses the latest measurement only.
        tolerance_db: dead band around the target, in dB.
        max_error_db: magnitude limit on the error used in one update, in dB.
        psnr_ceiling: value substituted for measurements above it (and for +inf), in dB.
    """

    def __init__(
        self,
        weight: float = 1.2,
        target_psnr: float = 33.0,
        rate: float = 0.02,
        min_weight: float = 1e-3,
        max_weight: float = 1e3,
        ema_decay: float = 0.9,
        tolerance_db: float = 0.0,
        max_error_db: float = 5.0,
        psnr_ceiling: float = 100.0,
    ) -> None:
        if not 0 < min_weight <= max_weight:
            raise ValueError(f"need 0 < min_weight <= max_weight, got {min_weight}, {max_weight}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.target_psnr = float(target_psnr)
        self.rate = float(rate)
        self.min_weight = float(min_weight)
        self.max_weight = float(max_weight)
        self.ema_decay = float(ema_decay)
        self.tolerance_db = float(tolerance_db)
        self.max_error_db = float(max_error_db)
        self.psnr_ceiling = float(psnr_ceiling)
        self.weight = min(max(float(weight), self.min_weight), self.max_weight)
        self.ema_psnr: float | None = None
        self.num_updates = 0

    def update(self, measured_psnr: float) -> float:
        """Fold in one PSNR measurement (dB, e.g. a batch mean) and return the new weight."""
        measured = float(measured_psnr)
        if math.isnan(measured):
            return self.weight
        measured = min(measured, self.psnr_ceiling)
        if self.ema_psnr is None:
            self.ema_psnr = measured
        else:
            self.ema_psnr = self.ema_decay * self.ema_psnr + (1.0 - self.ema_decay) * measured
        self.num_updates += 1
        error = self.target_psnr - self.ema_psnr
        if abs(error) <= self.tolerance_db:
            return self.weight
        error = max(-self.max_error_db, min(self.max_error_db, error))
        self.weight = min(
            max(self.weight * math.exp(self.rate * error), self.min_weight), self.max_weight
        )
        return self.weight

    def state_dict(self) -> dict[str, Any]:
        """All settings and the running state, as plain Python numbers (checkpointable)."""
        return {
            "weight": self.weight,
            "target_psnr": self.target_psnr,
            "rate": self.rate,
            "min_weight": self.min_weight,
            "max_weight": self.max_weight,
            "ema_decay": self.ema_decay,
            "tolerance_db": self.tolerance_db,
            "max_error_db": self.max_error_db,
            "psnr_ceiling": self.psnr_ceiling,
            "ema_psnr": self.ema_psnr,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; keys missing from ``state`` keep current values."""
        for key, value in state.items():
            if key not in self.state_dict():
                raise KeyError(f"unknown PSNRController state key {key!r}")
            setattr(self, key, value)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(weight={self.weight:.4g}, target_psnr={self.target_psnr}, "
            f"ema_psnr={self.ema_psnr}, num_updates={self.num_updates})"
        )
