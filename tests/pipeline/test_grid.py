"""A table's grid end to end on a tiny budget: methods x pirates x seeds, resume, tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from raeg_pl.cli import main
from raeg_pl.grid import parse_adv_train

REPO = Path(__file__).resolve().parents[2]
MAIN_QUICK = REPO / "experiments" / "main" / "quick.yaml"

ROWS = (
    "rows={raeg: {kind: raeg}, pgd: {kind: pgd, eps: 4, steps: 2},"
    " poison: {kind: poison, eps: 4, steps: 2},"
    " unlearnable: {kind: unlearnable, eps: 4, rounds: 1, train_steps: 2, pgd_steps: 2},"
    " rdh: {kind: rdh, eps: 4, steps: 2}}"
)
TINY = [
    "data.train_per_class=12",
    "data.val_per_class=4",
    "data.test_per_class=6",
    "data.batch_size=32",
    "surrogates.0.max_epochs=1",
    "protector.max_epochs=1",
    "protector.model.warmup_steps=1",
    "protector.model.adv_ramp_steps=2",
    "pirate.max_epochs=1",
    "pirate.data.val_per_class=2",
    "archs=[resnet, vit]",
    "heldout=[vit]",
    "seeds=[0, 1]",
    "pirate_defenses=[none]",
    "eval_defenses=[none, gray]",
    "reuse_from=null",
    "inference_per_class=3",
    ROWS,
]


def test_adv_train_spec():
    assert parse_adv_train("jpeg:q=75") is None
    assert parse_adv_train("adv_train:eps=4,steps=2") == {
        "adv_train_eps": 4.0,
        "adv_train_steps": 2,
    }
    with pytest.raises(ValueError, match="adv_train"):
        parse_adv_train("adv_train:epz=4")


@pytest.mark.data
def test_grid_runs_every_cell_resumes_and_builds_tables(data_root, cache_dir, tmp_path, capsys):
    run = tmp_path / "grid"
    data = [f"data.data_dir={data_root}", f"data.cache_dir={cache_dir}"]
    args = ["grid", "--config", str(MAIN_QUICK), "--run_dir", str(run), *TINY, *data]
    assert main(args) == 0
    plan = json.loads((run / "grid.json").read_text())
    assert plan["rows"] == ["clean", "raeg", "pgd", "poison", "unlearnable", "rdh"]

    # Every cell of the plan has its result file, with its place in the grid recorded.
    for row in plan["rows"]:
        for arch in ("resnet", "vit"):
            for seed in (0, 1):
                res = json.loads(
                    (
                        run / "pirates" / row / arch / "none" / f"seed{seed}" / "results.json"
                    ).read_text()
                )
                assert res["grid"]["row"] == row and res["grid"]["seed"] == seed
                assert res["grid"]["source"] == ("clean" if row == "clean" else "protected")
                assert 0.0 <= res["test_acc"] <= 1.0 and res["splits"]["train"] == 120 - 20
    for row in ("raeg", "rdh"):  # reversible: authorised models on the restored files
        for seed in (0, 1):
            res = json.loads(
                (
                    run / "pirates" / row / "resnet" / "authorized" / f"seed{seed}" / "results.json"
                ).read_text()
            )
            assert res["grid"]["source"] == "recovered"
    assert not (run / "pirates" / "pgd" / "resnet" / "authorized").exists()

    # Method stages: measured from the stored files, with the held-out classifier's figures.
    methods = {
        r: json.loads((run / "methods" / r / "results.json").read_text()) for r in plan["rows"][1:]
    }
    assert methods["rdh"]["reversible"] and methods["rdh"]["exact_pixel_rate_recovered"] == 1.0
    assert methods["raeg"]["psnr_recovered"] > 30
    for r in ("pgd", "poison", "unlearnable"):
        assert not methods[r]["reversible"] and methods[r]["psnr_recovered"] is None
        assert methods[r]["linf_protected"] <= 4 + 1e-4
        assert not (run / "methods" / r / "recovered").exists()
    for r in ("raeg", "pgd", "poison", "rdh"):
        assert set(methods[r]["heldout_acc_protected_by_defense"]["vit"]) == {"none", "gray"}
    assert methods["unlearnable"]["surrogate_acc_protected_by_defense"] == {}
    assert methods["pgd"]["inference_test_images"] == 30 and methods["pgd"]["test_images"] == 60
    for r in plan["rows"][1:]:
        assert len(list((run / "methods" / r / "protected" / "train").rglob("*.png"))) == 120
        # Class structure of the stored perturbation; null where a barely trained method left
        # every image unchanged (nothing to measure), a number for the sign attacks.
        share = methods[r]["perturbation_classmean_share"]
        assert share is None or 0.0 <= share <= 1.0
        if r in ("pgd", "poison"):
            assert 0.0 < share <= 1.0 and -1.0 <= methods[r]["perturbation_cos_same_class"] <= 1.0

    # A rerun has nothing to do.
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "running" not in out and out.count("done before, skipped") >= 2 * 6 * 2 + 4 + 5 + 1

    # Tables from the result files alone: every planned cell of the main table is filled.
    # The runs record the commit of the tree the tests run in, dirty while it is edited.
    tables = tmp_path / "tables"
    assert main(["table", "--runs", str(run), "--out", str(tables), "--allow-mixed"]) == 0
    md = (tables / "main.md").read_text()
    assert "cells missing" not in md or "0 of" in md
    with open(tables / "main.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert len(rows) >= 1 + 6
    for name in ("fidelity", "robustness", "inference"):
        assert (tables / f"{name}.md").is_file() and (tables / f"{name}.tex").is_file()


@pytest.mark.data
def test_grid_reuses_a_pipeline_run_and_refuses_a_changed_recipe(
    data_root, cache_dir, tmp_path, capsys
):
    data = [f"data.data_dir={data_root}", f"data.cache_dir={cache_dir}"]
    shared = [t for t in TINY[:8]] + data
    pipe = tmp_path / "pipeline"
    protect_quick = REPO / "experiments" / "protect" / "quick.yaml"
    pipe_args = ["pipeline", "--config", str(protect_quick), "--run_dir", str(pipe), *shared]
    assert main([*pipe_args, "--stop_after", "protector"]) == 3
    run = tmp_path / "grid"
    grid_args = [
        "grid", "--config", str(MAIN_QUICK), "--run_dir", str(run), *shared,
        "pirate.max_epochs=1", "pirate.data.val_per_class=2", "archs=[resnet]", "heldout=[]",
        "seeds=[0]", "pirate_defenses=[none]", "eval_defenses=[none]", "inference_per_class=3",
        f"reuse_from={pipe}",
    ]  # fmt: skip
    capsys.readouterr()
    assert main([*grid_args, "rows={raeg: {kind: raeg}}"]) == 0
    out = capsys.readouterr().out
    assert f"surrogate_0: reused from {pipe / 'surrogate_0'}" in out
    assert f"protector_raeg: reused from {pipe / 'protector'}" in out
    assert (run / "protector_raeg").resolve() == (pipe / "protector").resolve()
    assert (run / "pirates" / "raeg" / "resnet" / "authorized" / "seed0" / "results.json").is_file()
    # The same row with another protector setting cannot take the linked protector's place.
    changed = "rows={raeg: {kind: raeg, protector: {model: {kappa: 3.0}}}}"
    assert main([*grid_args, changed]) == 2
    captured = capsys.readouterr()
    assert f"{run / 'protector_raeg'}: this stage was run with another recipe" in captured.err
    assert "spec.model.kappa" in captured.err
