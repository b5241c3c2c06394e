"""The protection pipeline end to end on a tiny budget, and resuming after an interruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raeg_pl.cli import main
from raeg_pl.pipeline import load_pipeline_config

REPO = Path(__file__).resolve().parents[2]
QUICK = REPO / "experiments" / "protect" / "quick.yaml"
PIPELINE_CONFIGS = sorted((REPO / "experiments" / "protect").glob("*.yaml"))

pytestmark = pytest.mark.data

TINY = [
    "data.train_per_class=16",
    "data.val_per_class=4",
    "data.test_per_class=10",
    "data.batch_size=32",
    "surrogates.0.max_epochs=1",
    "surrogates.1.max_epochs=1",
    "protector.max_epochs=1",
    "protector.model.warmup_steps=1",
    "protector.model.adv_ramp_steps=2",
    # A 4-step fit at the quick learning rate can throw the protected images far (< 15 dB),
    # where clipping at 0/255 limits recovery; a smaller rate keeps this test's checks stable.
    "protector.model.lr=1e-4",
    "pirate.max_epochs=1",
    "pirate.data.val_per_class=2",
]


def _mtimes(run: Path, stage: str) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in (run / stage).rglob("*") if p.is_file()}


def test_pipeline_runs_end_to_end_and_resumes(data_root, cache_dir, tmp_path, capsys):
    run = tmp_path / "run"
    data = [f"data.data_dir={data_root}", f"data.cache_dir={cache_dir}"]
    args = ["pipeline", "--config", str(QUICK), "--run_dir", str(run), *TINY, *data]
    # Interrupted after the protector stage: the later stages have not run.
    assert main([*args, "--stop_after", "protector"]) == 3
    assert (run / "protector" / "results.json").is_file()
    assert not (run / "export").exists() and not (run / "results.json").exists()
    before = {**_mtimes(run, "surrogate_0"), **_mtimes(run, "protector")}
    capsys.readouterr()
    # The rerun skips the finished stages (their files untouched) and completes the rest.
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "surrogate_0: done before, skipped" in out and "protector: done before, skipped" in out
    assert {**_mtimes(run, "surrogate_0"), **_mtimes(run, "protector")} == before
    res = json.loads((run / "results.json").read_text())
    for key in (
        "psnr_protected",
        "ssim_protected",
        "psnr_recovered",
        "exact_pixel_rate_recovered",
        "surrogate_acc_clean",
        "surrogate_acc_protected",
        "clean_acc",
        "pirate_acc",
        "pirate_acc_peak",
        "authorized_acc",
        "pirate_acc_by_defense",
        "splits",
    ):
        assert key in res, key
    assert set(res["pirate_acc_by_defense"]) == {"none", "jpeg:q=75", "gray"}
    assert res["splits"]["protected_train"] == 160 and res["splits"]["test"] == 100
    # A 4-step protector is far from its PSNR target; recovery must still be near-exact.
    assert res["psnr_recovered"] > max(30.0, res["psnr_protected"] + 5)
    for folder in ("clean", "protected", "recovered"):
        assert len(list((run / "export" / folder / "train").rglob("*.png"))) == 160
    report = (run / "report.md").read_text()
    assert "pirate acc" in report and (run / "curves.png").is_file()
    # The owner's key file: the trained (label-conditioned) protector and the class names.
    from raeg_pl.io.keyfile import read_key

    key = read_key(run / "owner.raegkey")
    assert res["key_file"] == str(run / "owner.raegkey") and res["key_skipped"] is None
    protector = json.loads((run / "protector" / "results.json").read_text())
    assert key.fingerprint == protector["protector_fingerprint"] == res["key_fingerprint"]
    assert key.conditional and len(key.classes) == 10 and key.classes[0] == "airplane"
    key_stamp = (run / "owner.raegkey").stat().st_mtime_ns
    # A third run has nothing left to do.
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("done before, skipped") == 11 and "holds this protector, kept" in out
    assert (run / "owner.raegkey").stat().st_mtime_ns == key_stamp
    for stage in ("surrogate_0", "protector", "export", "pirate_none", "authorized"):
        assert json.loads((run / stage / "recipe.json").read_text())["hash"]
    # One copy of each trained model's weights on disk: a run's size is its models, once.
    for stage in ("surrogate_0", "protector", "pirate_none", "authorized"):
        files = [p.name for p in (run / stage / "checkpoints").iterdir() if not p.is_symlink()]
        assert files == ["latest.ckpt"], (stage, files)

    # A changed recipe is refused, naming the stage folder and the key, and nothing is
    # touched; moving the data root (not part of any recipe) changes nothing.
    stamp = {**_mtimes(run, "protector"), **_mtimes(run, "pirate_none")}
    # (Overrides on both sides of an option are read alike.)
    split = ["pipeline", "--config", str(QUICK), *TINY, "--run_dir", str(run), *data]
    assert main([*split, "protector.model.kappa=3.0"]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'protector'}: this stage was run with another recipe" in err
    assert "spec.model.kappa" in err
    assert {**_mtimes(run, "protector"), **_mtimes(run, "pirate_none")} == stamp
    # A pirate-only change stops at the first pirate; downstream of the protector, the
    # recorded upstream hash catches what the stage's own sections cannot.
    assert main([*args, "pirate.model.lr=0.1"]) == 2
    assert f"{run / 'pirate_none'}: this stage was run" in capsys.readouterr().err
    # Stages written before recipes were recorded are checked on their saved model section.
    (run / "protector" / "recipe.json").unlink()
    assert main([*args, "protector.model.label_conditioned=false"]) == 2
    assert "spec.model.label_conditioned" in capsys.readouterr().err
    assert main(args) == 0  # the unchanged config still reuses everything
    assert capsys.readouterr().out.count("done before, skipped") == 11


@pytest.mark.parametrize("config", PIPELINE_CONFIGS, ids=lambda p: p.name)
def test_pipeline_configs_match_the_constructors(config):
    import inspect

    from raeg_pl.data import ImageClassificationDataModule
    from raeg_pl.lit.classifier import ClassifierLitModule
    from raeg_pl.lit.protector import ProtectorLitModule

    cfg = load_pipeline_config(config)
    ImageClassificationDataModule(**cfg["data"])
    for section in [*cfg["surrogates"], cfg["pirate"]]:
        inspect.signature(ClassifierLitModule).bind(**section["model"])
        ImageClassificationDataModule(**{**cfg["data"], **section.get("data", {})})
    inspect.signature(ProtectorLitModule).bind(
        surrogate_checkpoints=["x"], **cfg["protector"]["model"]
    )
    assert cfg["profile"] in ("quick", "paper")


def test_unknown_pipeline_keys_are_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"defaults: [{QUICK}]\npirates: {{}}\n")
    with pytest.raises(ValueError, match="pirates"):
        load_pipeline_config(bad)


@pytest.mark.parametrize("key", ["max_epochs", "logger"])
def test_a_trainer_argument_each_stage_sets_is_refused_with_the_fix(tmp_path, key):
    from raeg_pl.stages.common import make_trainer

    with pytest.raises(ValueError, match=rf"trainer\.{key} is set by each stage.*max_epochs=N"):
        make_trainer(tmp_path / "surrogate_0", {key: 3}, 2, None, None)
    trainer, _ = make_trainer(tmp_path / "surrogate_0", {"max_steps": 3}, 2, None, None)
    assert trainer.max_epochs == 2 and trainer.max_steps == 3
