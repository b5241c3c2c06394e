"""What every run directory's Trainer gets: CSV (+ optional wandb) logs, checkpoints, history."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger

from raeg_pl.utils.callbacks import MetricHistory


def run_loggers(run_dir: str | os.PathLike, wandb: dict[str, Any] | None = None) -> list[Logger]:
    """A CSV logger writing into ``run_dir`` itself, plus wandb when ``wandb["enabled"]``.

    Args:
        run_dir: the run directory.
        wandb: ``enabled``, ``project``, ``group``, ``name``, ``tags``, ``offline``; offline
            mode is also taken from ``WANDB_MODE=offline`` and needs no account.
    """
    run_dir = Path(run_dir)
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="", version="")]
    if wandb and wandb.get("enabled"):
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(
            WandbLogger(
                project=wandb.get("project", "raeg-pl"),
                group=wandb.get("group"),
                name=wandb.get("name") or run_dir.name,
                tags=list(wandb.get("tags") or []),
                save_dir=str(run_dir),
                offline=bool(wandb.get("offline")) or os.environ.get("WANDB_MODE") == "offline",
            )
        )
    return loggers


def run_callbacks(
    run_dir: str | os.PathLike,
    callbacks: list[Callback] | None = None,
    monitor: str | None = "val/acc",
    mode: str = "max",
) -> tuple[list[Callback], MetricHistory]:
    """``callbacks`` plus a MetricHistory, a last/best ModelCheckpoint and an LR monitor."""
    callbacks = list(callbacks or [])
    history = MetricHistory()
    callbacks.append(history)
    if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
        callbacks.append(
            ModelCheckpoint(
                dirpath=str(Path(run_dir) / "checkpoints"),
                filename="best",
                monitor=monitor,
                mode=mode,
                save_last=True,
                save_top_k=1 if monitor else 0,
            )
        )
    callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    return callbacks, history
