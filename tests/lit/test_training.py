"""Real classifier training through the `raeg` CLI on a CIFAR-10 subset, single and DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raeg_pl.cli import lightning_main

REPO = Path(__file__).resolve().parents[2]
QUICK = REPO / "experiments" / "surrogate" / "quick.yaml"
RAEG = str(Path(sys.executable).with_name("raeg"))

pytestmark = [pytest.mark.data, pytest.mark.slow]


def _data_args(data_root, cache_dir, train=400, val=50, test=100, batch=128):
    return [
        "--data.data_dir",
        str(data_root),
        "--data.cache_dir",
        str(cache_dir),
        "--data.train_per_class",
        str(train),
        "--data.val_per_class",
        str(val),
        "--data.test_per_class",
        str(test),
        "--data.batch_size",
        str(batch),
    ]


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_small_classifier_learns_cifar10(data_root, cache_dir, tmp_path):
    run = tmp_path / "run"
    lightning_main(
        [
            "fit",
            "--config",
            str(QUICK),
            "--trainer.max_epochs",
            "6",
            "--trainer.enable_progress_bar",
            "false",
            "--run_dir",
            str(run),
            *_data_args(data_root, cache_dir, train=500, test=200),
        ]
    )
    res = _results(run)
    # 5,000 training images, 6 epochs: a working pipeline reaches ~50%; chance is 10%, and a
    # broken one (labels misaligned, no learning, augmentation wrecking images) stays < 25%.
    assert res["test_acc"] > 0.40, res["history"]
    assert res["splits"] == {"train": 5000, "val": 500, "test": 2000}
    assert len(res["history"]) == 6 and res["history"][-1]["val/acc"] > 0.35
    assert len(res["git"]) == 2 and len(res["config_hash"]) == 16
    for name in ("config.yaml", "metrics.csv", "checkpoints/last.ckpt", "checkpoints/best.ckpt"):
        assert (run / name).is_file(), name


def _raeg(*args, cwd):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [RAEG, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_ddp_on_cpu_matches_single_process(data_root, cache_dir, tmp_path):
    common = [
        "--config",
        str(QUICK),
        "--trainer.precision",
        "32-true",
        "--trainer.enable_progress_bar",
        "false",
        *_data_args(data_root, cache_dir, train=200, val=20, test=50, batch=64),
    ]
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2"]
    single, multi = tmp_path / "single", tmp_path / "multi"
    _raeg("fit", *common, "--trainer.max_epochs", "2", "--run_dir", str(single), cwd=tmp_path)
    _raeg("fit", *common, *ddp, "--trainer.max_epochs", "2", "--run_dir", str(multi), cwd=tmp_path)
    one, two = _results(single), _results(multi)
    # The global batch is split over the ranks: the same number of optimiser steps.
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["global_step"] == one["global_step"] == 2 * (2000 // 64)
    # Training differs only in per-rank BatchNorm statistics and shuffling order.
    assert abs(two["test_acc"] - one["test_acc"]) < 0.08, (one["test_acc"], two["test_acc"])
    # Evaluation of one checkpoint is the same metric whether it runs on 1 or 2 processes.
    ckpt = str(single / "checkpoints" / "last.ckpt")
    _raeg(
        "test", *common, *ddp, "--ckpt_path", ckpt, "--run_dir", str(tmp_path / "t2"), cwd=tmp_path
    )
    _raeg("test", *common, "--ckpt_path", ckpt, "--run_dir", str(tmp_path / "t1"), cwd=tmp_path)
    t1, t2 = _results(tmp_path / "t1"), _results(tmp_path / "t2")
    assert t2["world_size"] == 2
    assert t1["test_acc"] == pytest.approx(one["test_acc"], abs=1e-6)
    assert t2["test_acc"] == pytest.approx(t1["test_acc"], abs=1e-6)
    assert t2["metrics"]["test/loss"] == pytest.approx(t1["metrics"]["test/loss"], rel=1e-4)
