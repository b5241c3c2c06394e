"""Lightning callbacks shared by every training run."""

from __future__ import annotations

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
