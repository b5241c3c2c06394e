"""Every stage's fit leaves a resumable last.ckpt after each epoch, monitored metric or not."""

from __future__ import annotations

import lightning as L
import pytest
import torch


class _StopAtEpoch(L.Callback):
    """Interrupts a fit at the start of epoch ``epoch``, as a killed job would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("interrupted")


@pytest.mark.parametrize("monitor", [None, "val/acc"])
def test_an_interrupted_fit_resumes_from_its_last_epoch(
    fit_fake_classifier, tmp_path, monitor
) -> None:
    torch.set_num_threads(1)
    stage = tmp_path / "stage"
    with pytest.raises(RuntimeError, match="interrupted"):
        fit_fake_classifier(stage, 3, [_StopAtEpoch(2)], monitor=monitor)
    last = stage / "checkpoints" / "last.ckpt"
    assert last.is_file(), "no checkpoint after two finished epochs"
    assert torch.load(last, weights_only=False)["epoch"] == 1
    fit_fake_classifier(stage, 3, [], monitor=monitor, ckpt_path=str(last))
    assert torch.load(last, weights_only=False)["epoch"] == 2
    assert (last.parent / "best.ckpt").is_file() == (monitor is not None)
    # last.ckpt names the newest epoch's file instead of holding a second copy of it.
    assert last.is_symlink() and last.resolve() == (last.parent / "latest.ckpt").resolve()
    copies = [p.name for p in last.parent.iterdir() if not p.is_symlink()]
    assert sorted(copies) == sorted(["latest.ckpt"] + (["best.ckpt"] if monitor else []))
