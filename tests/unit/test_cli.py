"""Config composition (`defaults:` chains) and the `raeg` entry point."""

from __future__ import annotations

import pytest
import yaml

from raeg_pl.cli import expand_config_args, main


def test_defaults_chain_applies_bases_first(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "a.yaml").write_text("trainer:\n  max_epochs: 1\nx: 1\n")
    (tmp_path / "base" / "b.yaml").write_text("defaults: [a.yaml]\ntrainer:\n  max_epochs: 2\n")
    (tmp_path / "exp.yaml").write_text("defaults: [base/b.yaml]\nrun_dir: r\n")
    args = expand_config_args(["fit", "--config", str(tmp_path / "exp.yaml"), "--x", "3"])
    texts = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    assert [yaml.safe_load(t) for t in texts] == [
        {"trainer": {"max_epochs": 1}, "x": 1},
        {"trainer": {"max_epochs": 2}},
        {"run_dir": "r"},
    ]
    assert args[0] == "fit" and args[-2:] == ["--x", "3"]


def test_circular_defaults_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    with pytest.raises(ValueError, match="circular"):
        expand_config_args(["--config", str(tmp_path / "a.yaml")])


def test_missing_base_is_named(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: [gone.yaml]\n")
    with pytest.raises(FileNotFoundError, match="gone.yaml"):
        expand_config_args(["--config", str(tmp_path / "a.yaml")])


def test_unknown_command_exits_non_zero(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main(["--help"]) == 0


def test_help_names_only_paths_that_exist(capsys):
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    paths = re.findall(r"experiments/[\w./-]+\.yaml", text)
    assert len(paths) >= 3
    missing = [p for p in paths if not (repo / p).is_file()]
    assert missing == [], f"raeg --help names missing files: {missing}"


def test_metric_history_rows_hold_their_own_epoch():
    import lightning as L
    import torch

    from raeg_pl.utils.callbacks import MetricHistory

    class Probe(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, i):
            return (self.w - 1).pow(2).sum()

        def validation_step(self, batch, i):
            pass

        def on_validation_epoch_end(self):
            self.log("val/epoch_seen", float(self.current_epoch))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    history = MetricHistory()
    data = torch.utils.data.DataLoader(torch.zeros(4, 1), batch_size=2)
    trainer = L.Trainer(
        max_epochs=3,
        callbacks=[history],
        logger=False,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(Probe(), data, data)
    assert [row["val/epoch_seen"] for row in history.history] == [0.0, 1.0, 2.0]
