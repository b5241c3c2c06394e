"""Every stage's fit leaves a resumable last.ckpt after each epoch, monitored metric or not."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from raeg_pl.utils.trainer import run_callbacks, run_loggers


class _StopAtEpoch(L.Callback):
    """Interrupts a fit at the start of epoch ``epoch``, as a killed job would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("interrupted")


def _fit(fake_data, tmp_path, monitor, callbacks, ckpt_path=None, epochs=3):
    from raeg_pl.data import ImageClassificationDataModule
    from raeg_pl.lit.classifier import ClassifierLitModule

    L.seed_everything(0)
    dm = ImageClassificationDataModule(
        dataset="fake",
        data_dir=str(fake_data),
        cache_dir=str(tmp_path / "cache"),
        download=False,
        val_per_class=2,
        batch_size=6,
        val_on_test=True,
    )
    model = ClassifierLitModule(arch="resnet_tiny_cifar", num_classes=3, lr=0.05)
    stage = tmp_path / "stage"
    all_callbacks, _ = run_callbacks(stage, callbacks, monitor=monitor)
    trainer = L.Trainer(
        default_root_dir=str(stage),
        max_epochs=epochs,
        callbacks=all_callbacks,
        logger=run_loggers(stage),
        accelerator="cpu",
        enable_model_summary=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return stage / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("monitor", [None, "val/acc"])
def test_an_interrupted_fit_resumes_from_its_last_epoch(fake_data, tmp_path, monitor) -> None:
    torch.set_num_threads(1)
    with pytest.raises(RuntimeError, match="interrupted"):
        _fit(fake_data, tmp_path, monitor, [_StopAtEpoch(2)])
    last = tmp_path / "stage" / "checkpoints" / "last.ckpt"
    assert last.is_file(), "no checkpoint after two finished epochs"
    assert torch.load(last, weights_only=False)["epoch"] == 1
    _fit(fake_data, tmp_path, monitor, [], ckpt_path=str(last))
    assert torch.load(last, weights_only=False)["epoch"] == 2
    assert (last.parent / "best.ckpt").is_file() == (monitor is not None)
