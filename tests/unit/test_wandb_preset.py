"""The wandb logger preset: derived run settings, offline runs, image grids, final metrics."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import yaml
from lightning.pytorch.loggers import WandbLogger
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from raeg_pl.data import ImageClassificationDataModule
from raeg_pl.pipeline import load_pipeline_config
from raeg_pl.utils.run import to_float_dict
from raeg_pl.utils.trainer import (
    end_wandb_run,
    flatten_config,
    log_final_metrics,
    run_callbacks,
    run_loggers,
    wandb_settings,
)

REPO = Path(__file__).resolve().parents[2]
QUICK = REPO / "experiments" / "protect" / "quick.yaml"
WANDB_PRESET = REPO / "experiments" / "_base" / "wandb.yaml"


# ------------------------------------------------------------------------- helpers
def _wandb_env(mp: pytest.MonkeyPatch, root: Path, mode: str = "offline") -> None:
    """Points every wandb folder into ``root`` and sets ``WANDB_MODE`` (no account, no network)."""
    _finish_wandb()
    for var, sub in (
        ("WANDB_DIR", "wandb_dir"),
        ("WANDB_CONFIG_DIR", "wandb_config"),
        ("WANDB_CACHE_DIR", "wandb_cache"),
        ("WANDB_DATA_DIR", "wandb_data"),
    ):
        (root / sub).mkdir(parents=True, exist_ok=True)
        mp.setenv(var, str(root / sub))
    mp.setenv("WANDB_MODE", mode)
    mp.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_SWEEP_ID", "WANDB_PROJECT"):
        mp.delenv(var, raising=False)


def _read_wandb_records(path: Path) -> list:
    """The records of a ``run-<id>.wandb`` file: a W&B header, then a LevelDB-style log.

    The log is 32 KiB blocks of chunks, each ``crc32 (4) | length (2, LE) | type (1)``
    followed by its bytes; type 1 is a whole record, 2/3/4 the first/middle/last part of
    one. Each record is a serialised ``wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    block, pos, parts, payloads = 32 * 1024, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer: zero padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding up to the end of the block
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            parts = chunk
        elif kind == 3:
            parts += chunk
        elif kind == 4:
            payloads.append(parts + chunk)
    records = []
    for payload in payloads:
        rec = pb.Record()
        rec.ParseFromString(payload)
        records.append(rec)
    return records


def _items(items) -> dict:
    """Config / summary / history items as a dict; ``nested_key`` paths become nested dicts."""
    out: dict = {}
    for it in items:
        path = [it.key] if it.key else list(it.nested_key)
        typed = it.WhichOneof("value") if "value" in it.DESCRIPTOR.oneofs_by_name else None
        if typed is None:
            value = json.loads(it.value_json)
        elif typed == "none":
            value = None
        elif typed == "json":
            value = json.loads(it.json)
        else:
            value = getattr(it, typed)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return out


def _offline_run(run_dir: Path) -> tuple[Path, list]:
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"expected one offline run under {run_dir / 'wandb'}, got {runs}"
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    return runs[0], _read_wandb_records(files[0])


def _finish_wandb() -> None:
    """Ends the active run and drops wandb's process-wide settings (read from the env once)."""
    import wandb

    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()


# --------------------------------------------------------------------- pure settings
def test_wandb_settings_derive_group_name_tags_and_job_type():
    base = {"enabled": True, "tags": ["paper"], "offline": True}
    s = wandb_settings(
        base, table="main-quick", row="raeg", seed=0, stage="protector", profile="quick"
    )
    assert s["project"] == "raeg-pl"
    assert s["group"] == "main-quick"
    assert s["name"] == "raeg-protector-s0"
    assert s["tags"] == ["paper", "main-quick", "raeg", "quick", "seed0", "protector"]
    assert s["job_type"] == "protector"
    assert s["offline"] is True and s["enabled"] is True
    assert base == {"enabled": True, "tags": ["paper"], "offline": True}, "base was modified"
    # The base's project is kept; missing facets drop out of the name and tags.
    s2 = wandb_settings({"enabled": True, "project": "other"}, seed=3, stage="pirate_none")
    assert s2["project"] == "other" and s2["name"] == "pirate_none-s3"
    assert s2["tags"] == ["seed3", "pirate_none"] and "group" not in s2
    # Nothing derived: the base's own group / name stay.
    s3 = wandb_settings({"enabled": True, "group": "g", "name": "n"})
    assert (s3["group"], s3["name"], s3["tags"]) == ("g", "n", []) and "job_type" not in s3


def test_wandb_settings_none_when_disabled():
    assert wandb_settings(None, table="t", stage="s") is None
    assert wandb_settings({}, table="t") is None
    assert wandb_settings({"enabled": False, "project": "p"}, table="t") is None


def test_the_wandb_preset_enables_logging():
    preset = yaml.safe_load(WANDB_PRESET.read_text())["wandb"]
    s = wandb_settings(preset, table="main-quick", row="raeg", seed=1, stage="export")
    assert s is not None and s["project"] == "raeg-pl" and s["name"] == "raeg-export-s1"


def test_flatten_config_keys_are_pipeline_override_paths():
    cfg = load_pipeline_config(QUICK)
    flat = flatten_config(cfg)
    assert flat["protector.model.l_adv"] == cfg["protector"]["model"]["l_adv"]
    assert flat["data.train_per_class"] == cfg["data"]["train_per_class"]
    assert flat["surrogates"] == cfg["surrogates"]  # lists stay values
    # Every flat key, applied back as a `key.path=value` override, reproduces the config.
    overrides = [
        f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
        for k, v in flat.items()
    ]
    assert load_pipeline_config(QUICK, overrides) == cfg


# ------------------------------------------------------------------- logger plumbing
def test_no_wandb_logger_without_enabled_settings(tmp_path):
    loggers = run_loggers(tmp_path / "run", None)
    assert [type(lg).__name__ for lg in loggers] == ["CSVLogger"]
    assert len(run_loggers(tmp_path / "run2", {"enabled": False})) == 1
    assert log_final_metrics(loggers, {"pirate_acc": 0.5}) is False
    assert log_final_metrics(None, {"pirate_acc": 0.5}) is False


def test_disabled_mode_wins_over_offline(tmp_path, monkeypatch):
    _wandb_env(monkeypatch, tmp_path, mode="disabled")
    settings = wandb_settings({"enabled": True, "offline": True}, table="t", stage="s", seed=0)
    loggers = run_loggers(tmp_path / "run", settings, config={"seed": 0})
    try:
        assert isinstance(loggers[1], WandbLogger)
        assert log_final_metrics(loggers, {"pirate_acc": 0.5}) is True
        assert os.environ["WANDB_MODE"] == "disabled"
        assert not (tmp_path / "run" / "wandb").exists(), "a disabled run wrote files"
    finally:
        _finish_wandb()


def test_sweep_agent_project_wins(tmp_path, monkeypatch):
    _wandb_env(monkeypatch, tmp_path, mode="disabled")
    settings = wandb_settings({"enabled": True, "project": "raeg-pl"}, stage="protector")
    assert run_loggers(tmp_path / "a", settings)[1].name == "raeg-pl"
    monkeypatch.setenv("WANDB_PROJECT", "team-sweeps")
    # Outside a sweep the config's project stays; an agent's run joins the sweep's project.
    assert run_loggers(tmp_path / "b", settings)[1].name == "raeg-pl"
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    assert run_loggers(tmp_path / "c", settings)[1].name == "team-sweeps"


def test_each_stage_gets_its_own_offline_run(tmp_path, monkeypatch):
    _wandb_env(monkeypatch, tmp_path)
    try:
        for stage in ("surrogate_0", "protector"):
            loggers = run_loggers(
                tmp_path / stage, wandb_settings({"enabled": True}, row="raeg", stage=stage)
            )
            loggers[1].log_metrics({"x": 1.0}, step=0)
            assert end_wandb_run(loggers) is True
        assert end_wandb_run() is False  # nothing open any more
        _finish_wandb()  # stops wandb's service, which writes the run files out
        names = []
        for stage in ("surrogate_0", "protector"):
            _, records = _offline_run(tmp_path / stage)
            names += [r.run.display_name for r in records if r.WhichOneof("record_type") == "run"]
        assert names == ["raeg-surrogate_0", "raeg-protector"]
        # A CSV-only stage leaves an open run alone; so does a sweep agent's trial.
        loggers = run_loggers(tmp_path / "summary", {"enabled": True, "name": "summary"})
        loggers[1].log_metrics({"x": 2.0}, step=0)
        assert end_wandb_run(loggers[:1]) is False
        monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
        assert end_wandb_run(loggers) is False
        import wandb

        assert wandb.run is not None
    finally:
        _finish_wandb()


# ------------------------------------------------------------ offline runs, real data
@pytest.fixture(scope="module")
def offline_classifier_run(data_root, cache_dir, tmp_path_factory):
    """A 2-step offline-wandb fit of a small classifier on 100 real CIFAR-10 images."""
    root = tmp_path_factory.mktemp("wandb_classifier")
    run_dir = root / "surrogate_0"
    with pytest.MonkeyPatch.context() as mp:
        _wandb_env(mp, root)
        from raeg_pl.lit.classifier import ClassifierLitModule

        L.seed_everything(0)
        dm = ImageClassificationDataModule(
            data_dir=str(data_root),
            cache_dir=str(cache_dir),
            download=False,
            train_per_class=10,
            val_per_class=2,
            test_per_class=2,
            batch_size=50,
        )
        model = ClassifierLitModule(arch="resnet_tiny_cifar", lr=0.05)
        settings = wandb_settings(
            {"enabled": True, "project": "raeg-pl-test"},
            table="main-quick",
            row="raeg",
            seed=0,
            stage="surrogate_0",
            profile="quick",
        )
        config = flatten_config({"seed": 0, "surrogates": {"0": {"model": {"lr": 0.05}}}})
        callbacks, _ = run_callbacks(run_dir)
        loggers = run_loggers(run_dir, settings, config=config)
        trainer = L.Trainer(
            accelerator="cpu",
            max_steps=2,
            limit_val_batches=1,
            log_every_n_steps=1,
            num_sanity_val_steps=0,
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=loggers,
            callbacks=callbacks,
            default_root_dir=str(run_dir),
        )
        try:
            trainer.fit(model, datamodule=dm)
            final = {k: v for k, v in to_float_dict(trainer.callback_metrics).items()}
            final["pirate_acc"] = final["val/acc"]
            final["by_defense"] = {"none": final["val/acc"]}
            written = log_final_metrics(trainer.loggers, final)
        finally:
            _finish_wandb()
        assert trainer.global_step == 2 and dm.split_sizes["train"] == 100
        yield {
            "run_dir": run_dir,
            "settings": settings,
            "config": config,
            "final": final,
            "written": written,
            "ckpt": run_dir / "checkpoints" / "last.ckpt",
            "datamodule": dm,
        }


@pytest.mark.data
def test_offline_run_records_group_name_tags_config_and_summary(offline_classifier_run):
    run = offline_classifier_run
    run_folder, records = _offline_run(run["run_dir"])
    assert run["written"] is True
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "run" in kinds and "summary" in kinds and "history" in kinds
    rr = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert rr.display_name == "raeg-surrogate_0-s0"
    assert rr.run_group == "main-quick"
    assert rr.job_type == "surrogate_0"
    assert rr.project == "raeg-pl-test"
    assert list(rr.tags) == ["main-quick", "raeg", "quick", "seed0", "surrogate_0"]
    config = _items(rr.config.update)
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update(_items(r.config.update))
    assert config["seed"] == 0 and config["surrogates.0.model.lr"] == 0.05
    # Lightning's log_hyperparams adds the module's hyperparameters to the same config.
    assert config["arch"] == "resnet_tiny_cifar"
    summary: dict = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(_items(r.summary.update))
    assert summary["pirate_acc"] == pytest.approx(run["final"]["val/acc"])
    assert summary["by_defense"] == {"none": pytest.approx(run["final"]["val/acc"])}
    assert 0.0 <= summary["pirate_acc"] <= 1.0
    history = [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    assert any("train/loss" in h for h in history)
    assert any("val/acc" in h for h in history)
    # The CSV log sits beside it in the same run directory.
    assert (run["run_dir"] / "metrics.csv").is_file()


@pytest.mark.data
def test_protector_grid_reaches_an_offline_wandb_run(offline_classifier_run, tmp_path, monkeypatch):
    from raeg_pl.lit.protector import ProtectorLitModule

    _wandb_env(monkeypatch, tmp_path)
    run_dir = tmp_path / "protector"
    L.seed_everything(0)
    # The real images the surrogate was trained on, already decoded by the fixture.
    train_set = offline_classifier_run["datamodule"].train_set
    images = train_set.images[:20].float() / 255
    loader = DataLoader(TensorDataset(images, train_set.labels[:20]), batch_size=10)
    model = ProtectorLitModule(
        [str(offline_classifier_run["ckpt"])],
        levels=1,
        blocks_per_level=1,
        hidden_channels=8,
        train_defenses=[],
        eval_defenses=["none"],
        grid_images=4,
        warmup_steps=0,
    )
    settings = wandb_settings({"enabled": True}, table="main-quick", row="raeg", stage="protector")
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=run_loggers(run_dir, settings),
        enable_checkpointing=False,
        default_root_dir=str(run_dir),
    )
    try:
        trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)
    finally:
        _finish_wandb()
    run_folder, records = _offline_run(run_dir)
    rr = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (rr.display_name, rr.job_type) == ("raeg-protector", "protector")
    grids = [
        h["val/grid"]
        for h in (
            _items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"
        )
        if "val/grid" in h
    ]
    assert len(grids) == 1, "the validation grid was not logged to wandb"
    grid = grids[0]
    # 4 rows (original / protected / difference / recovered) of 4 images, 1-pixel padding.
    side = 4 * (32 + 1) + 1
    assert (grid["width"], grid["height"]) == (side, side)
    assert grid["captions"] == ["original / protected / 10x difference / recovered"]
    (media,) = grid["filenames"]
    with Image.open(run_folder / "files" / media) as img:
        logged = np.asarray(img.convert("RGB"), dtype=np.int16)
    with Image.open(run_dir / "grids" / "epoch_000.png") as img:
        saved = np.asarray(img.convert("RGB"), dtype=np.int16)
    # The same pixels as the grid saved beside the checkpoints (a [0, 1] float grid cast
    # to uint8 unscaled would be all 0/1); rounding modes may differ by one level.
    assert logged.shape == saved.shape == (side, side, 3)
    assert saved.std() > 20, "the saved grid holds no image"
    assert np.abs(logged - saved).max() <= 1
