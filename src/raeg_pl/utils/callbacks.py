"""Lightning callbacks shared by every training run."""

from __future__ import annotations

import math
import time

import lightning as L

from raeg_pl.utils.run import to_float_dict


class MetricHistory(L.Callback):
    """Records every validation epoch's metrics with elapsed training time.

    ``history`` is a list of ``{"epoch", "step", "elapsed_s", <metric>: value}`` rows: the
    learning curve written to results.json.
    """

    def __init__(self) -> None:
        self.history: list[dict] = []
        self._t0: float | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        self.history = []

    def on_validation_end(self, trainer, pl_module) -> None:
        # Not on_validation_epoch_end: callbacks run before the module's own epoch-end hook,
        # so metrics the module logs there would land in the next epoch's row.
        if trainer.sanity_checking or self._t0 is None:
            return
        row = {
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "elapsed_s": round(time.perf_counter() - self._t0, 2),
        }
        row.update(
            {
                k: v
                for k, v in to_float_dict(trainer.callback_metrics).items()
                if k.startswith(("val/", "train/"))
            }
        )
        self.history.append(row)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))


# Metrics shown in progress lines when a run logs them: classifier training loss and
# accuracies, then the protector's image quality, protection strength and PSNR controller.
PROGRESS_METRICS = (
    "train/loss",
    "val/loss",
    "val/acc",
    "val/test_acc",
    "val/psnr_protected",
    "val/psnr_recovered",
    "val/surrogate_acc_protected/none",
    "val/target_hit_rate",
    "train/psnr_protected",
    "train/w_img",
)


def format_duration(seconds: float) -> str:
    """A duration as ``42s``, ``3m05s`` or ``2h04m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressReport(L.Callback):
    """Progress of a fit for people watching it: a live bar on a terminal, lines in a log.

    Every training epoch ends with one line: the stage, ``epoch k/N``, elapsed time, the
    estimated time left and the metrics of :data:`PROGRESS_METRICS` the run has logged so
    far (validation metrics are those of the epoch just validated). Within an epoch, a line
    with ``step k/N`` and the time left is written every ``every_s`` seconds, so a long
    epoch is never a silence. On a terminal (``stream.isatty()``) the within-epoch report is
    a bar redrawn in place instead; when Lightning's own progress bar is on, a terminal
    shows that one and this callback writes nothing. Only global rank 0 writes.

    The time left is extrapolated from the optimiser steps taken in this invocation (a
    resumed fit does not count its earlier steps) towards the fit's total
    (``trainer.estimated_stepping_batches``).

    Args:
        name: the stage shown at the start of each line, e.g. ``"protector"``.
        every_s: seconds between within-epoch lines in a log.
        stream: where to write; default: ``sys.stdout`` at the time of writing.
    """

    redraw_s = 0.5  # seconds between redraws of the bar on a terminal

    def __init__(self, name: str, every_s: float = 60.0, stream=None) -> None:
        self.name = name
        self.every_s = float(every_s)
        self._stream = stream
        self._t0: float | None = None
        self._step0 = 0
        self._last_line = 0.0
        self._drawn = False

    # ------------------------------------------------------------------ output
    @property
    def stream(self):
        import sys

        return self._stream if self._stream is not None else sys.stdout

    def _live(self, trainer) -> bool:
        """True on a terminal without Lightning's bar: draw a bar in place."""
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty()) and trainer.progress_bar_callback is None

    def _silent(self, trainer) -> bool:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return True
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty()) and trainer.progress_bar_callback is not None

    def _write(self, text: str, newline: bool = True) -> None:
        if self._drawn:
            text = "\r\x1b[2K" + text  # replace the bar drawn in place
        self._drawn = not newline
        self.stream.write(text + ("\n" if newline else ""))
        self.stream.flush()

    # ----------------------------------------------------------------- figures
    def _timing(self, trainer) -> tuple[float, str]:
        elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
        done = trainer.global_step - self._step0
        try:
            total = float(trainer.estimated_stepping_batches)
        except Exception:  # noqa: BLE001 - a progress line must never stop a fit
            total = math.inf
        if done <= 0 or not math.isfinite(total):
            return elapsed, "?"
        left = max(0.0, total - trainer.global_step) * elapsed / done
        return elapsed, format_duration(left)

    def _epoch(self, trainer) -> str:
        n = trainer.max_epochs
        return f"epoch {trainer.current_epoch + 1}/{n if n is not None and n >= 0 else '?'}"

    @staticmethod
    def _metrics(trainer) -> str:
        values = to_float_dict(trainer.callback_metrics)
        return "  ".join(f"{k} {values[k]:.4g}" for k in PROGRESS_METRICS if k in values)

    def _line(self, trainer, where: str) -> str:
        elapsed, left = self._timing(trainer)
        parts = [
            f"[{self.name}] {self._epoch(trainer)}{where}",
            f"elapsed {format_duration(elapsed)}",
            f"ETA {left}",
        ]
        metrics = self._metrics(trainer)
        return "  ".join(parts + ([metrics] if metrics else []))

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()
        self._last_line = self._t0
        self._step0 = trainer.global_step
        self._drawn = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._silent(trainer):
            return
        now = time.perf_counter()
        live = self._live(trainer)
        if now - self._last_line < (self.redraw_s if live else self.every_s):
            return
        self._last_line = now
        n = trainer.num_training_batches
        total = str(n) if math.isfinite(n) else "?"
        step = f", step {batch_idx + 1}/{total}"
        if not live:
            self._write(self._line(trainer, step))
            return
        width = 20
        filled = int(width * (batch_idx + 1) / n) if math.isfinite(n) and n else 0
        bar = f" |{'#' * filled}{'.' * (width - filled)}|"
        self._write(self._line(trainer, bar + step), newline=False)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Lightning runs the epoch's validation before this hook: its metrics are current.
        if self._silent(trainer):
            return
        self._last_line = time.perf_counter()
        self._write(self._line(trainer, " done"))

    def on_train_end(self, trainer, pl_module) -> None:
        if self._drawn and not self._silent(trainer):
            self._write("")
