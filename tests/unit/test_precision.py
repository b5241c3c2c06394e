"""bf16 on a CPU without native bf16 runs in float32; everywhere else precision is as asked."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import raeg_pl.utils.trainer as trainer_utils
from raeg_pl.stages.common import make_trainer
from raeg_pl.utils.trainer import CPU_BF16_ENV, effective_precision

CPU_PRESET = Path(__file__).resolve().parents[2] / "experiments" / "_base" / "cpu.yaml"


@pytest.fixture
def slow_bf16(monkeypatch):
    """A CPU whose bf16 is emulated (AVX2 only)."""
    monkeypatch.setattr(trainer_utils, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    monkeypatch.setattr(trainer_utils, "_PRECISION_NOTICES", set())


def test_bf16_on_a_cpu_without_it_runs_in_float32_and_says_so(slow_bf16, caplog):
    with caplog.at_level(logging.WARNING, logger="raeg_pl"):
        assert effective_precision("bf16-mixed", "cpu") == "32-true"
        assert effective_precision("bf16-mixed", "cpu") == "32-true"
    notices = [r for r in caplog.records if "without native bf16" in r.getMessage()]
    assert len(notices) == 1  # once per process, not once per stage
    assert CPU_BF16_ENV in notices[0].getMessage()


def test_precision_is_kept_where_bf16_is_native_asked_for_or_not_bf16(slow_bf16, monkeypatch):
    assert effective_precision("32-true", "cpu") == "32-true"
    assert effective_precision("16-mixed", "cpu") == "16-mixed"
    assert effective_precision(None, "cpu") is None
    assert effective_precision("bf16-mixed", "gpu") == "bf16-mixed"
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert effective_precision("bf16-mixed", "cpu") == "bf16-mixed"
    monkeypatch.delenv(CPU_BF16_ENV)
    monkeypatch.setattr(trainer_utils, "cpu_has_fast_bf16", lambda: True)
    assert effective_precision("bf16-mixed", "cpu") == "bf16-mixed"


def test_a_stage_trainer_runs_with_the_effective_precision(slow_bf16, tmp_path):
    cfg = {"accelerator": "cpu", "devices": 1, "precision": "bf16-mixed"}
    trainer, _ = make_trainer(tmp_path, cfg, max_epochs=1, wandb=None, monitor=None)
    assert trainer.precision == "32-true"
    assert cfg["precision"] == "bf16-mixed"  # the config (and so the recipe) is untouched


def test_the_lightning_cli_runs_with_the_effective_precision(slow_bf16, preset_cli):
    assert preset_cli(CPU_PRESET).trainer.precision == "32-true"
