"""Shared fixtures: the real CIFAR-10 copy, a private decoded-tensor cache, tiny folders."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from raeg_pl.data.datamodule import resolve_data_root

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs one worker per core) each worker computes on one
    thread, and so do the processes its tests start: two workers with a team of OpenMP
    threads each on two cores wait for each other's threads many times over."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def _data_required() -> bool:
    return bool(os.environ.get("RAEG_REQUIRE_DATA") or os.environ.get("CI"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The data root holding ``cifar10/{train,test}``; fails in CI when it is missing."""
    root = resolve_data_root(None)
    if not (root / "cifar10" / "train").is_dir() or not (root / "cifar10" / "test").is_dir():
        msg = (
            f"real CIFAR-10 not found at {root}/cifar10/{{train,test}}; "
            "set RAEG_DATA_DIR to the folder that holds cifar10/"
        )
        if _data_required():
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """The decoded-tensor cache: $RAEG_CACHE_DIR when set (reused across runs), else temporary."""
    env = os.environ.get("RAEG_CACHE_DIR")
    return Path(env) if env else tmp_path_factory.mktemp("cache")


@pytest.fixture()
def small_folder(data_root, tmp_path) -> Path:
    """A real ImageFolder dataset: 12 train and 4 test CIFAR-10 JPEGs for each of 3 classes."""
    out = tmp_path / "tiny"
    for split, n in (("train", 12), ("test", 4)):
        for cls in ("airplane", "cat", "ship"):
            src = sorted((data_root / "cifar10" / split / cls).iterdir())[:n]
            dst = out / split / cls
            dst.mkdir(parents=True)
            for f in src:
                shutil.copy2(f, dst / f.name)
    return out


@pytest.fixture()
def preset_cli(tmp_path, small_folder):
    """Builds (does not run) the LightningCLI of a config on ``small_folder``: call it with
    the config file and more command-line arguments."""
    from raeg_pl.cli import lightning_main

    def build(config: Path, *args: str):
        return lightning_main(
            [
                "--config",
                str(config),
                *args,
                "--data.dataset",
                small_folder.name,
                "--data.data_dir",
                str(small_folder.parent),
                "--data.val_per_class",
                "2",
                "--data.cache_dir",
                str(tmp_path / "c"),
                "--run_dir",
                str(tmp_path / "run"),
            ],
            run=False,
        )

    return build


@pytest.fixture(scope="session")
def tiny_data(data_root, cache_dir) -> dict:
    """Data-module arguments of the tiny real-CIFAR-10 protector fits (2 val/test per class)."""
    return {
        "data_dir": str(data_root),
        "cache_dir": str(cache_dir),
        "download": False,
        "val_per_class": 2,
        "test_per_class": 2,
    }


@pytest.fixture(scope="session")
def tiny_surrogate(tiny_data, tmp_path_factory) -> Path:
    """Checkpoint of a one-epoch surrogate on 50 real CIFAR-10 images (trained once)."""
    from raeg_pl.pipeline import train_classifier

    stage = tmp_path_factory.mktemp("tiny_surrogate")
    train_classifier(
        stage,
        {"arch": "resnet_tiny_cifar", "lr": 0.2},
        {**tiny_data, "train_per_class": 5, "batch_size": 50},
        {"accelerator": "cpu", "enable_progress_bar": False},
        1,
        seed=0,
    )
    return stage / "checkpoints" / "last.ckpt"


@pytest.fixture()
def fit_tiny_protector(tiny_data, tiny_surrogate, tmp_path):
    """Fits a small ProtectorLitModule for 3 steps on 40 real images; returns
    ``(model, trainer, datamodule)``. Keyword arguments go to the module, except
    ``validate`` (run one validation batch per epoch), ``precision`` and ``before_fit``
    (called with the module before training)."""
    import lightning as L

    from raeg_pl.data import ImageClassificationDataModule
    from raeg_pl.lit.protector import ProtectorLitModule

    def fit(validate: bool = False, precision: str = "32-true", before_fit=None, **model_kwargs):
        L.seed_everything(0)
        dm = ImageClassificationDataModule(
            **{**tiny_data, "train_per_class": 4, "batch_size": 20, "augment": False}
        )
        kwargs = {
            "psnr_target": None,
            "warmup_steps": 1,
            "adv_ramp_steps": 1,
            "train_defenses": [],
            "eval_defenses": ["none"],
            "grid_images": 0,
            **model_kwargs,
        }
        model = ProtectorLitModule([str(tiny_surrogate)], **kwargs)
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=3,
            logger=False,
            precision=precision,
            enable_checkpointing=False,
            enable_progress_bar=False,
            num_sanity_val_steps=0,
            limit_val_batches=1 if validate else 0,
            default_root_dir=str(tmp_path / "protector"),
        )
        if before_fit is not None:
            before_fit(model)
        trainer.fit(model, datamodule=dm)
        return model, trainer, dm

    return fit


FAKE_CLASSES = ("alpha", "beta", "gamma")
FAKE_PER_CLASS = {"train": 8, "test": 4}


@pytest.fixture(scope="session")
def fake_data(tmp_path_factory) -> Path:
    """A tiny synthetic ImageFolder dataset, made here: no real data, no download.

    ``<root>/fake/{train,test}/<class>/*.png``: 3 classes, 8 training and 4 test 32x32 RGB
    PNGs per class. Each class has its own mean colour plus seeded noise, so a classifier
    can learn something and no two images are alike. Returns ``<root>``: use it as
    ``data.data_dir`` with ``data.dataset: fake``.
    """
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("fake_root")
    rng = np.random.default_rng(0)
    for split, n in FAKE_PER_CLASS.items():
        for c, name in enumerate(FAKE_CLASSES):
            folder = root / "fake" / split / name
            folder.mkdir(parents=True)
            base = np.zeros(3)
            base[c] = 150.0
            for i in range(n):
                pixels = base + rng.normal(60.0, 40.0, size=(32, 32, 3))
                img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB")
                img.save(folder / f"{split}_{name}_{i:02d}.png")
    return root


@pytest.fixture
def fit_fake_classifier(fake_data):
    """A function running a real ClassifierLitModule fit on :func:`fake_data`.

    ``fit(stage_dir, epochs, callbacks=None, monitor="val/acc", ckpt_path=None,
    **trainer_kwargs)`` fits a tiny ResNet with the run's callbacks
    (:func:`raeg_pl.utils.trainer.run_callbacks`) and loggers and returns the Trainer.
    """
    import lightning as L

    from raeg_pl.data import ImageClassificationDataModule
    from raeg_pl.lit.classifier import ClassifierLitModule
    from raeg_pl.utils.trainer import run_callbacks, run_loggers

    def fit(stage, epochs, callbacks=None, monitor="val/acc", ckpt_path=None, **trainer_kwargs):
        L.seed_everything(0)
        dm = ImageClassificationDataModule(
            dataset="fake",
            data_dir=str(fake_data),
            cache_dir=str(Path(stage).parent / "cache"),
            download=False,
            val_per_class=2,
            batch_size=6,
            val_on_test=True,
        )
        model = ClassifierLitModule(arch="resnet_tiny_cifar", num_classes=3, lr=0.05)
        all_callbacks, _ = run_callbacks(stage, callbacks, monitor=monitor)
        trainer = L.Trainer(
            default_root_dir=str(stage),
            max_epochs=epochs,
            callbacks=all_callbacks,
            logger=run_loggers(stage),
            accelerator="cpu",
            enable_model_summary=False,
            num_sanity_val_steps=0,
            **{"enable_progress_bar": False, **trainer_kwargs},
        )
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return trainer

    return fit
