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
    "surrogates.1.max_epochs=1",
    "protector.max_epochs=1",
    "protector.model.warmup_steps=1",
    "protector.model.adv_ramp_steps=2",
    "pirate.max_epochs=1",
    "pirate.data.val_per_class=2",
    "archs=[resnet]",
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
        for arch in ("resnet",):
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
    assert "running" not in out and out.count("done before, skipped") >= 6 * 2 + 4 + 5 + 1

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


STANDARD_MAIN = REPO / "experiments" / "main" / "standard.yaml"


def test_worker_jobs_cover_every_cell_once_in_phases():
    from raeg_pl.grid import Grid, load_grid_config, worker_jobs

    cfg = load_grid_config(STANDARD_MAIN)
    grid = Grid(cfg)
    phases = worker_jobs(grid)
    rows = list(cfg["rows"])
    assert phases[0] == [["pirate_rows=[]", "--shared-only"]]
    assert phases[1] == [["pirate_rows=[]", "--rows", r] for r in rows]
    assert phases[-1] == [["--plan"]]
    cells, authorised = [], []
    for job in phases[2]:
        defense = job[job.index("--defenses") + 1]
        arch = job[job.index("--archs") + 1]
        (seed,) = [int(a[len("seeds=[") : -1]) for a in job if a.startswith("seeds=")]
        assert job[job.index("--rows") + 1 : job.index("--archs")] == rows
        cells.append((seed, defense, arch))
        if "--skip-authorized" not in job:
            authorised.append((seed, arch))
    expected = {
        (s, d, a) for s in cfg["seeds"] for d in cfg["pirate_defenses"] for a in cfg["archs"]
    }
    assert len(cells) == len(expected) and set(cells) == expected
    # The authorised classifiers of a seed and architecture go with exactly one job.
    assert sorted(authorised) == sorted((s, a) for s in cfg["seeds"] for a in cfg["archs"])
    # Seed-major, and a seed's adversarial-training jobs (the costliest) first.
    seeds = [c[0] for c in cells]
    assert seeds == sorted(seeds)
    first = [c[1] for c in cells if c[0] == cfg["seeds"][0]]
    assert first[0].startswith("adv_train") and not any(
        d.startswith("adv_train") for d in first[2:]
    )


def _one_step_grid(run, fake_data, tmp_path) -> list[str]:
    """``raeg grid`` of the standard main table on fake data: one step of every stage."""
    return [
        "grid",
        "--config",
        str(STANDARD_MAIN),
        "--run_dir",
        str(run),
        f"data.data_dir={fake_data}",
        "data.dataset=fake",
        f"data.cache_dir={tmp_path / 'cache'}",
        "data.download=false",
        "data.train_per_class=4",
        "data.val_per_class=1",
        "data.test_per_class=2",
        "protector.data.train_per_class=4",
        "pirate.data.val_per_class=1",
        "trainer.max_steps=1",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.precision=32-true",
        "protector.model.warmup_steps=0",
        "protector.model.adv_ramp_steps=1",
        "seeds=[0]",
    ]


def test_grid_workers_fill_the_same_cells_as_one_process(fake_data, tmp_path):
    """``--workers 2`` on fake data: every planned cell and authorised classifier, once."""
    run = tmp_path / "grid"
    args = [
        *_one_step_grid(run, fake_data, tmp_path),
        "pirate_defenses=[none, gray]",
        "wandb=null",
        "--rows",
        "raeg_paper",
        "classwise_noise",
        "--archs",
        "resnet",
        "--workers",
        "2",
    ]
    assert main(args) == 0, sorted(p.name for p in (run / "workers").glob("*.log"))
    plan = json.loads((run / "grid.json").read_text())["tables"]["main"]
    assert plan["seeds"] == [0] and plan["pirate_rows"] == ["clean", *plan["methods"]]
    for seed in (0,):
        for defense in ("none", "gray"):
            for arch in ("resnet",):
                for row in ("clean", "raeg_paper", "classwise_noise"):
                    cell = run / "pirates" / row / arch / defense / f"seed{seed}"
                    assert (cell / "results.json").is_file(), cell
        authorised = sorted(
            (p.parts[-4], p.parts[-3]) for p in run.glob(f"pirates/*/*/authorized/seed{seed}")
        )
        assert authorised == [("raeg_paper", "resnet")], authorised
    # Rows outside --rows were not run.
    assert not (run / "methods" / "poison").exists()


def test_overrides_after_list_options_are_overrides(tmp_path, capsys):
    """`--defenses none seeds=[1]`: the override is not read as a defence."""
    run = tmp_path / "grid"
    args = ["grid", "--config", str(STANDARD_MAIN), "--run_dir", str(run), "--plan"]
    args += ["--rows", "poison", "--defenses", "none", "jpeg:q=10", "seeds=[1]", "archs=[vit]"]
    assert main(args) == 0
    plan = json.loads((run / "grid.json").read_text())["tables"]["main"]
    assert plan["seeds"] == [1] and plan["archs"] == ["vit"]


def test_archs_outside_the_tables_pirates_are_refused():
    """`--archs vit` on a table that trains only the ResNet would train nothing: refused,
    with the way to add it; the override `archs=[vit]` selects it."""
    from raeg_pl.grid import Grid, load_grid_config

    cfg = load_grid_config(STANDARD_MAIN, ["archs=[resnet]"])
    with pytest.raises(ValueError, match=r"--archs \['vit'\]: not among .*archs=\["):
        Grid(cfg, archs=["vit"])
    assert Grid(cfg, archs=["resnet"]).archs == ["resnet"]
    grid = Grid(load_grid_config(STANDARD_MAIN, ["archs=[vit]"]), archs=["vit"])
    assert grid.archs == ["vit"]


SHARED_ROWS = (
    "rows={a: {kind: raeg}, b: {kind: raeg, refine_steps: 2},"
    " c: {kind: raeg, protector: {model: {psnr_target: 30.0}}},"
    " noise: {kind: classwise_noise}}"
)


def test_rows_with_the_same_protector_recipe_share_one_fit_and_one_worker_job():
    from raeg_pl.grid import Grid, load_grid_config, worker_jobs

    grid = Grid(load_grid_config(STANDARD_MAIN, [SHARED_ROWS]))
    owners = {r: grid.protector_owner(r) for r in ("a", "b", "c", "noise")}
    assert owners == {"a": "a", "b": "a", "c": "c", "noise": "noise"}
    phases = worker_jobs(grid)
    assert phases[1] == [
        ["pirate_rows=[]", "--rows", "a", "b"],
        ["pirate_rows=[]", "--rows", "c"],
        ["pirate_rows=[]", "--rows", "noise"],
    ]


def test_a_row_that_only_refines_reuses_the_protector(fake_data, tmp_path):
    run = tmp_path / "grid"
    args = [
        *_one_step_grid(run, fake_data, tmp_path),
        "pirate_defenses=[none]",
        "pirate_rows=[]",
        "heldout=[]",
        "wandb=null",
        SHARED_ROWS,
        "--rows",
        "a",
        "b",
    ]
    assert main(args) == 0
    assert sorted(p.name for p in run.glob("protector_*")) == ["protector_a"]
    a = json.loads((run / "methods" / "a" / "results.json").read_text())
    b = json.loads((run / "methods" / "b" / "results.json").read_text())
    assert b["method"]["refine_steps"] == 2 and "refine_steps" not in a["method"]
    assert a["method"]["protector_fingerprint"] == b["method"]["protector_fingerprint"]
    # The protector's fit counts towards RAEG's crafting cost (the fidelity table).
    fitted = json.loads((run / "protector_a" / "results.json").read_text())
    assert a["protector_fit_seconds"] == fitted["fit_seconds"] > 0
    assert a["protector_train_images"] == fitted["splits"]["train"] > 0
    # b's method stage names protector_a's recipe as its upstream.
    recipe = json.loads((run / "methods" / "b" / "recipe.json").read_text())
    protector = json.loads((run / "protector_a" / "recipe.json").read_text())
    assert recipe["recipe"]["upstream"]["protector"] == protector["hash"]


def test_a_grid_resumes_from_kept_records_on_a_fresh_machine(fake_data, tmp_path, capsys):
    """Session 1 runs a grid and keeps its records; session 2, with no run folder (a fresh
    machine), resumes from them: the wholly kept row runs nothing (no protector, no method
    stage), a row with one missing pirate reruns its method stage and that pirate only, and
    the tables built from both are complete."""
    from raeg_pl.tables import build_all

    first = tmp_path / "first" / "grid"
    common = ["pirate_defenses=[none, gray]", "wandb=null", "--archs", "resnet"]
    rows = ["--rows", "raeg_paper", "classwise_noise"]
    assert main([*_one_step_grid(first, fake_data, tmp_path), *common, *rows]) == 0
    records = tmp_path / "records"
    build_all([first], tmp_path / "t1", ["main"], allow_mixed=True, keep_records=records)
    kept = records / "grid"
    dropped = kept / "pirates" / "classwise_noise" / "resnet" / "gray" / "seed0"
    for f in dropped.iterdir():
        f.unlink()
    dropped.rmdir()

    second = tmp_path / "second" / "grid"
    capsys.readouterr()
    args = [*_one_step_grid(second, fake_data, tmp_path), *common, *rows, "--records", str(kept)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "rows wholly kept: ['raeg_paper']" in out
    # raeg_paper: kept whole; its protector never ran, nor its method stage, nor the
    # surrogates' checkpoints beyond what classwise_noise's method stage needs.
    assert not (second / "protector_raeg_paper").exists()
    assert not (second / "methods" / "raeg_paper" / "protected").exists()
    assert (second / "methods" / "raeg_paper" / "results.json").is_file()
    assert "protector_raeg_paper: running" not in out
    # classwise_noise: its method stage ran again, and only the dropped pirate trained.
    assert "methods/classwise_noise: running" in out
    assert "pirates/classwise_noise/resnet/gray/seed0: running" in out
    trained = out.count("surrogate_0: running") + out.count("surrogate_1: running")
    assert out.count(": running") == 2 + trained
    for row in ("clean", "raeg_paper", "classwise_noise"):
        for defense in ("none", "gray"):
            assert (
                second / "pirates" / row / "resnet" / defense / "seed0" / "results.json"
            ).is_file()
    # A kept record of another recipe is named and not used.
    capsys.readouterr()
    third = tmp_path / "third" / "grid"
    args = [
        *_one_step_grid(third, fake_data, tmp_path),
        *common,
        "--rows",
        "classwise_noise",
        "--records",
        str(records),
        "pirate.max_epochs=2",
        "--defenses",
        "none",
        "--skip-authorized",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "pirates/clean/resnet/none/seed0: kept record not used" in out
    assert "pirates/clean/resnet/none/seed0: running" in out


def test_held_out_classifiers_do_not_follow_the_pirate_seeds():
    """The method stages attack one set of held-out classifiers, at the grid's seed: a run
    (or a worker job) of other pirate seeds plans the same ones, so the method stages it
    shares keep their recipes (seeds=[1,2] after [0,1,2] trained seed-1 classifiers and
    then refused every method stage as changed)."""
    from raeg_pl.grid import Grid, load_grid_config

    main_quick = REPO / "experiments" / "main" / "quick.yaml"
    full = Grid(load_grid_config(main_quick))
    later = Grid(load_grid_config(main_quick, ["seeds=[1,2]"]))
    assert full.heldout and later.seeds == [1, 2]
    dirs = [later.heldout_dir(a) for a in later.heldout]
    assert dirs == [full.heldout_dir(a) for a in full.heldout]
    assert all(d.name == "seed0" for d in dirs), dirs
    assert [Grid(load_grid_config(main_quick, ["seed=3"])).heldout_dir("vgg").name] == ["seed3"]


def test_a_resumed_method_stage_trains_the_held_out_classifiers_it_attacks(
    fake_data, tmp_path, capsys
):
    """Records hold no weights: a method stage run again on a fresh machine trains the
    held-out classifiers again (their records alone would leave them out of its inference-time
    figures, while its recipe named them)."""
    from raeg_pl.tables import build_all

    first = tmp_path / "first" / "grid"
    common = ["pirate_defenses=[none]", "wandb=null", "heldout=[vit]", "--archs", "resnet"]
    rows = ["--rows", "classwise_noise", "--skip-authorized"]
    assert main([*_one_step_grid(first, fake_data, tmp_path), *common, *rows]) == 0
    assert (
        "vit"
        in json.loads((first / "methods/classwise_noise/results.json").read_text())[
            "heldout_acc_clean"
        ]
    )
    records = tmp_path / "records"
    build_all([first], tmp_path / "t1", ["main"], allow_mixed=True, keep_records=records)
    dropped = records / "grid" / "pirates" / "classwise_noise" / "resnet" / "none" / "seed0"
    for f in dropped.iterdir():
        f.unlink()
    dropped.rmdir()

    second = tmp_path / "second" / "grid"
    capsys.readouterr()
    args = [*_one_step_grid(second, fake_data, tmp_path), *common, *rows]
    assert main([*args, "--records", str(records / "grid")]) == 0
    out = capsys.readouterr().out
    assert "pirates/clean/vit/none/seed0: running" in out
    assert "left out" not in out
    results = json.loads((second / "methods/classwise_noise/results.json").read_text())
    assert "vit" in results["heldout_acc_clean"]
    assert (second / "pirates/clean/vit/none/seed0/checkpoints/last.ckpt").is_file()
