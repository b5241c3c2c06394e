"""Progress of long fits: one line per epoch in a log, a bar on a terminal, no Lightning tips."""

from __future__ import annotations

import io
import logging
import re
import warnings

import lightning as L

from raeg_pl.utils.callbacks import ProgressReport, format_duration
from raeg_pl.utils.trainer import (
    LIGHTNING_RANK_ZERO_LOGGERS,
    stage_label,
)

EPOCH_LINE = re.compile(
    r"^\[(?P<name>[^\]]+)\] epoch (?P<k>\d+)/(?P<n>\d+) done  elapsed [\dhms]+  ETA ([\dhms]+|\?)"
)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_duration():
    assert [format_duration(s) for s in (0, 42.4, 185, 7440)] == ["0s", "42s", "3m05s", "2h04m"]


def test_stage_label_names_grid_pirates_by_their_cell(tmp_path):
    assert stage_label(tmp_path / "run" / "protector") == "protector"
    leaf = tmp_path / "grid" / "pirates" / "raeg" / "vgg" / "none" / "seed0"
    assert stage_label(leaf) == "pirates/raeg/vgg/none/seed0"


def test_a_fit_writes_one_line_per_epoch_and_no_tips(
    fake_data, fit_fake_classifier, tmp_path, capsys
):
    # Messages Lightning logs at rank zero, seen where the Trainer sends them.
    records: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())
    loggers = [logging.getLogger(name) for name in LIGHTNING_RANK_ZERO_LOGGERS]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    # Folders that hold files before the fit (a resumed stage, a stage's recipe.json).
    for sub in ("checkpoints", ""):
        (tmp_path / "surrogate_0" / sub).mkdir(parents=True, exist_ok=True)
        (tmp_path / "surrogate_0" / sub / "existing.txt").write_text("x")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            capsys.readouterr()
            fit_fake_classifier(tmp_path / "surrogate_0", epochs=2)
            out = capsys.readouterr().out
    finally:
        for log, level in zip(loggers, levels, strict=True):
            log.removeHandler(handler)
            log.setLevel(level)

    lines = [line for line in out.splitlines() if EPOCH_LINE.match(line)]
    assert len(lines) == 2, out
    for k, line in enumerate(lines, start=1):
        m = EPOCH_LINE.match(line)
        assert (m["name"], int(m["k"]), int(m["n"])) == ("surrogate_0", k, 2)
        for key in ("train/loss", "val/acc", "val/test_acc"):
            assert re.search(rf"  {re.escape(key)} -?\d", line), (key, line)
    assert lines[-1].split("ETA ")[1].startswith("0s")  # nothing left after the last epoch
    # Lightning's own messages still arrive; its advertising tips do not.
    assert any("GPU available" in r for r in records), records
    assert not [r for r in records if "Tip" in r]
    assert "Tip" not in out
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    assert not [w for w in caught if "LeafSpec" in str(w.message)]


def test_a_long_epoch_reports_its_steps(fake_data, fit_fake_classifier, tmp_path):
    log = io.StringIO()
    report = ProgressReport("pirate_none", every_s=0.0, stream=log)
    fit_fake_classifier(tmp_path / "surrogate_0", epochs=1, callbacks=[report])
    lines = log.getvalue().splitlines()
    # 18 training images in batches of 6: three steps, each followed by a line (every_s=0).
    steps = [line for line in lines if ", step " in line]
    assert [re.search(r"step (\d+)/(\d+)", s).groups() for s in steps] == [
        ("1", "3"),
        ("2", "3"),
        ("3", "3"),
    ]
    assert all(s.startswith("[pirate_none] epoch 1/1, step ") and "ETA " in s for s in steps)
    assert lines[-1].startswith("[pirate_none] epoch 1/1 done")
    assert "\r" not in log.getvalue()  # a log gets whole lines, never a redrawn bar


def test_a_terminal_gets_a_bar_unless_lightning_draws_one(fake_data, fit_fake_classifier, tmp_path):
    term = _Terminal()
    report = ProgressReport("protector", stream=term)
    report.redraw_s = 0.0
    fit_fake_classifier(tmp_path / "a" / "surrogate_0", epochs=1, callbacks=[report])
    text = term.getvalue()
    assert "\r" in text and "|######" in text and "[protector] epoch 1/1 done" in text
    # Lightning's own bar on a terminal: this callback stays silent.
    term = _Terminal()
    report = ProgressReport("protector", stream=term)
    report.redraw_s = 0.0
    fit_fake_classifier(
        tmp_path / "b" / "surrogate_0", epochs=1, callbacks=[report], enable_progress_bar=True
    )
    assert term.getvalue() == ""


def test_protector_lines_show_fidelity_protection_and_the_controller(
    fake_data, fit_fake_classifier, tmp_path
):
    """The protector's epoch line names what a newcomer watches: PSNR protected and
    recovered, the surrogate's accuracy on protected validation images, l_img's weight."""
    from raeg_pl.data import ImageClassificationDataModule
    from raeg_pl.lit.protector import ProtectorLitModule

    surrogate = fit_fake_classifier(tmp_path / "s" / "surrogate_0", epochs=1)
    ckpt = surrogate.checkpoint_callback.last_model_path
    dm = ImageClassificationDataModule(
        dataset="fake",
        data_dir=str(fake_data),
        cache_dir=str(tmp_path / "cache"),
        download=False,
        val_per_class=2,
        batch_size=6,
        augment=False,
    )
    model = ProtectorLitModule(
        [ckpt],
        levels=1,
        blocks_per_level=1,
        hidden_channels=8,
        psnr_target=33.0,
        warmup_steps=0,
        adv_ramp_steps=1,
        train_defenses=[],
        eval_defenses=["none"],
        grid_images=0,
    )
    log = io.StringIO()
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[ProgressReport("protector", stream=log)],
    )
    trainer.fit(model, datamodule=dm)
    line = log.getvalue().splitlines()[-1]
    assert line.startswith("[protector] epoch 1/1 done"), line
    for key in (
        "val/psnr_protected",
        "val/psnr_recovered",
        "val/surrogate_acc_protected/none",
        "train/w_img",
    ):
        assert re.search(rf"  {re.escape(key)} -?\d", line), (key, line)
