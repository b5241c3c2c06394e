"""A short ProtectorLitModule fit on real CIFAR-10 images against a real trained surrogate."""

from __future__ import annotations

import lightning as L
import pytest
from torch.utils.data import DataLoader, TensorDataset

from raeg_pl.data import ImageClassificationDataModule
from raeg_pl.lit.protector import ProtectorLitModule
from raeg_pl.pipeline import train_classifier

pytestmark = [pytest.mark.data, pytest.mark.slow]


def test_short_fit_fools_the_surrogate_and_stays_reversible(data_root, cache_dir, tmp_path):
    # float32 throughout: the same figures on every CPU (bf16 runs natively on some CPUs and
    # as float32 on others: raeg_pl.utils.trainer.effective_precision).
    data = {
        "data_dir": str(data_root),
        "cache_dir": str(cache_dir),
        "download": False,
        "val_per_class": 10,
        "test_per_class": 20,
        "batch_size": 128,
    }
    train_classifier(
        tmp_path / "surrogate",
        {"arch": "resnet_tiny_cifar", "lr": 0.2},
        {**data, "train_per_class": 300},
        {"accelerator": "cpu", "precision": "32-true", "enable_progress_bar": False},
        8,
        seed=0,
    )
    ckpt = tmp_path / "surrogate" / "checkpoints" / "last.ckpt"
    L.seed_everything(0)
    dm = ImageClassificationDataModule(
        **{**data, "train_per_class": 12, "batch_size": 40, "augment": False}
    )
    model = ProtectorLitModule(
        [str(ckpt)],
        levels=2,
        blocks_per_level=2,
        hidden_channels=32,
        lr=1e-3,
        adv_mode="targeted",
        l_adv=0.1,
        psnr_target=None,
        l_img=10.0,
        warmup_steps=5,
        adv_ramp_steps=10,
        train_defenses=[],
        eval_defenses=["none"],
        grid_images=4,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=40,
        logger=False,
        precision="32-true",
        enable_checkpointing=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        gradient_clip_val=1.0,
        default_root_dir=str(tmp_path / "protector"),
    )
    trainer.fit(model, datamodule=dm)
    assert model.recoveries == 0
    # Evaluate on the images it protected, after real 8-bit storage, without augmentation.
    evaluator = L.Trainer(
        accelerator="cpu",
        logger=False,
        precision="32-true",
        enable_progress_bar=False,
        default_root_dir=str(tmp_path / "eval"),
    )
    fit_set = TensorDataset(dm.train_set.images.float() / 255, dm.train_set.labels)
    metrics = evaluator.validate(
        model, dataloaders=DataLoader(fit_set, batch_size=40), verbose=False
    )[0]
    clean = metrics["val/surrogate_acc_clean"]
    protected = metrics["val/surrogate_acc_protected/none"]
    assert clean > 0.4, metrics
    assert protected < clean - 0.25, metrics
    assert metrics["val/target_hit_rate"] > 0.3, metrics
    assert metrics["val/psnr_recovered"] > 35, metrics
    assert metrics["val/psnr_protected"] > 18, metrics
