"""Every experiment config parses and runs one batch; every preset builds a trainer."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raeg_pl.cli import lightning_main
from raeg_pl.config import GRID_KEYS, PIPELINE_KEYS, deep_merge, load_config_texts

REPO = Path(__file__).resolve().parents[2]
# Top-level keys that only ``raeg pipeline`` / ``raeg grid`` read; a LightningCLI config has
# ``run_dir``, ``trainer``, ``data`` and ``wandb`` too, so those say nothing.
PIPELINE_ONLY = (set(PIPELINE_KEYS) | set(GRID_KEYS)) - {
    "run_dir",
    "seed",
    "trainer",
    "data",
    "wandb",
}


def is_pipeline_config(path: Path) -> bool:
    """Pipeline and grid configs and their presets, not LightningCLI ones."""
    cfg: dict = {}
    for text in load_config_texts(path):
        cfg = deep_merge(cfg, yaml.safe_load(text) or {})
    return bool(PIPELINE_ONLY & set(cfg))


EXPERIMENTS = sorted(
    p
    for p in (REPO / "experiments").rglob("*.yaml")
    if "_base" not in p.parts and "sweeps" not in p.parts and not is_pipeline_config(p)
)
PRESETS = sorted(
    p for p in (REPO / "experiments" / "_base").glob("*.yaml") if not is_pipeline_config(p)
)
# Run anywhere: the CUDA, DDP and compile choices are swapped for one plain CPU process, the
# rest is as written.
CPU = [
    "--model.compile",
    "false",
    "--trainer.accelerator",
    "cpu",
    "--trainer.devices",
    "1",
    "--trainer.strategy",
    "auto",
    "--trainer.sync_batchnorm",
    "false",
]


def test_there_are_experiments():
    assert len(EXPERIMENTS) >= 2 and len(PRESETS) >= 3


@pytest.mark.data
@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_experiment_runs_one_batch(config, data_root, cache_dir, tmp_path):
    cli = lightning_main(
        [
            "fit",
            "--config",
            str(config),
            *CPU,
            "--trainer.fast_dev_run",
            "1",
            "--data.data_dir",
            str(data_root),
            "--data.cache_dir",
            str(cache_dir),
            "--data.batch_size",
            "32",
            "--data.test_per_class",
            "10",
            "--run_dir",
            str(tmp_path / "run"),
        ]
    )
    assert cli.trainer.global_step == 1
    assert cli.trainer.state.finished


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_preset_builds_a_trainer(preset, preset_cli):
    cli = preset_cli(preset, *CPU, "--wandb.offline", "true")
    assert cli.trainer is not None and cli.model.hparams.num_classes == 3
