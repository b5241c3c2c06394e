"""Every table's grid config (quick and paper) is complete and names only things that exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from raeg_pl.config import load_grid_config, validate_grid_config
from raeg_pl.defenses.pirate import INVERSE_STEPS, parse_pirate_defense
from raeg_pl.grid import Grid

REPO = Path(__file__).resolve().parents[2]
TABLES = ("main", "robustness", "fidelity", "inference", "ablation")
GRIDS = [REPO / "experiments" / t / f"{p}.yaml" for t in TABLES for p in ("quick", "paper")]
# Grids of one profile on another dataset (the digits: one channel, 36-39 test images a class).
GRIDS += [REPO / "experiments" / "ablation" / "digits_quick.yaml"]
DIGITS_ABLATION = GRIDS[-1]
PIPELINES = sorted((REPO / "experiments" / "protect").glob("*.yaml"))
MAIN_QUICK = REPO / "experiments" / "main" / "quick.yaml"


@pytest.mark.parametrize("table", TABLES)
def test_each_table_has_both_profiles_and_a_readme(table):
    folder = REPO / "experiments" / table
    for name in ("quick.yaml", "paper.yaml", "README.md"):
        assert (folder / name).is_file(), f"{folder / name} missing"
    readme = (folder / "README.md").read_text()
    assert (
        f"experiments/{table}/quick.yaml" in readme and f"experiments/{table}/paper.yaml" in readme
    )


@pytest.mark.parametrize("config", GRIDS + PIPELINES, ids=lambda p: str(p.relative_to(REPO)))
def test_config_is_valid(config):
    cfg = load_grid_config(config)
    assert validate_grid_config(cfg) == []
    if "table" in cfg:
        grid = Grid(cfg)
        plan = grid.plan()
        assert plan["table"] == config.parent.name
        assert plan["rows"][0] == "clean" and len(plan["rows"]) >= 2
        assert set(plan["archs"]) <= set(grid.pirates)


def test_quick_and_paper_grids_have_the_same_rows_and_defences():
    for table in TABLES:
        quick = Grid(load_grid_config(REPO / "experiments" / table / "quick.yaml")).plan()
        paper = Grid(load_grid_config(REPO / "experiments" / table / "paper.yaml")).plan()
        assert quick["rows"] == paper["rows"], table
        assert [d.split(",")[0] for d in quick["defenses"]] == [
            d.split(",")[0] for d in paper["defenses"]
        ], table
        assert quick["profile"] == "quick" and paper["profile"] == "paper"


def test_main_table_covers_four_architecture_families():
    for profile in ("quick", "paper"):
        grid = Grid(load_grid_config(REPO / "experiments" / "main" / f"{profile}.yaml"))
        archs = " ".join(grid.pirates[a]["model"]["arch"] for a in grid.archs)
        for family in ("resnet", "vgg", "mobilenet", "vit"):
            assert family in archs, (profile, family)


def test_robustness_grid_covers_every_pirate_defence():
    cfg = load_grid_config(REPO / "experiments" / "robustness" / "quick.yaml")
    names = {d.split(":")[0] for d in cfg["pirate_defenses"]}
    qualities = {d for d in cfg["pirate_defenses"] if d.startswith("jpeg")}
    assert {"none", "gray", "blur", "median", "noise", "bits", "resize", "adv_train"} <= names
    # The adaptive pirates, and adversarial training at the literature's 8/255.
    assert {"classpattern", "inverse", "ueraser"} <= names
    # Learned inverses from 100 and 1,000 leaked pairs, each keeping the best of several
    # initialisations (one fit can stall), the 1,000-pair one trained ten times longer.
    inverses = {
        d.params["k"]: d
        for d in map(parse_pirate_defense, cfg["pirate_defenses"])
        if d.name == "inverse"
    }
    assert set(inverses) == {100, 1000}
    assert all(d.params["restarts"] > 1 for d in inverses.values())
    assert inverses[1000].params["steps"] >= 10 * INVERSE_STEPS
    assert any(d.startswith("adv_train:eps=8") for d in cfg["pirate_defenses"])
    assert qualities == {f"jpeg:q={q}" for q in (90, 75, 50, 30, 10)}


@pytest.mark.parametrize(
    "override, problem",
    [
        ("rows.pgd.epss=3", "unknown argument 'epss'"),
        ("pirates.vgg.model.arch=vgg_nope", "not a registered timm model"),
        ("protector.model.l_advv=1", "unknown argument 'l_advv'"),
        ("rows.raeg_cond.protector.model.foo=1", "unknown argument 'foo'"),
        ("rows.pgd.kind=pgdx", "unknown method kind"),
        ("pirate_defenses=[none, 'jpegx:q=5']", "jpegx"),
        ("pirate_defenses=[none, 'adv_train:epz=3']", "adv_train"),
    ],
)
def test_a_misspelt_setting_is_reported(override, problem):
    cfg = load_grid_config(REPO / "experiments" / "main" / "quick.yaml", [override])
    if "adv_train" in override:
        with pytest.raises(ValueError, match="adv_train"):
            Grid(cfg)
        return
    problems = validate_grid_config(cfg)
    assert any(problem in p for p in problems), problems


def test_plan_flag_records_each_tables_plan_without_running(tmp_path, capsys):
    import json

    from raeg_pl.cli import main

    run = tmp_path / "grid"
    for table in ("main", "robustness"):
        config = REPO / "experiments" / table / "quick.yaml"
        assert main(["grid", "--config", str(config), "--run_dir", str(run), "--plan"]) == 0
    plan = json.loads((run / "grid.json").read_text())
    assert set(plan["tables"]) == {"main", "robustness"}
    for table in ("main", "robustness"):
        cfg = load_grid_config(REPO / "experiments" / table / "quick.yaml")
        assert plan["tables"][table]["seeds"] == cfg["seeds"], table
    assert plan["seeds"] == [0, 1, 2]  # the union: three seeds for every quick table's cells
    assert "adv_train:eps=6,steps=2" in plan["defenses"]  # the union of both tables
    assert sorted(p.name for p in run.iterdir()) == ["grid.json"]  # nothing else ran
    assert "plan of table 'robustness' written" in capsys.readouterr().out


# ----------------------------------------------------------------- raeg grid --check builds
def _build_sections(cfg: dict) -> str:
    """The config sections the build check depends on (grids sharing them build the same)."""
    import json

    keys = ("data", "seed", "surrogates", "protector", "pirate", "pirates", "rows")
    adv = [d for d in cfg.get("pirate_defenses") or [] if d.startswith("adv_train")]
    return json.dumps([{k: cfg.get(k) for k in keys}, cfg.get("method_defaults"), adv])


def _grids_by_build() -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for config in GRIDS:
        groups.setdefault(_build_sections(load_grid_config(config)), []).append(config)
    return {str(paths[0].relative_to(REPO)): paths for paths in groups.values()}


BUILD_GROUPS = _grids_by_build()


@pytest.mark.parametrize("first", sorted(BUILD_GROUPS))
def test_real_grids_pass_the_build_check(first, capsys):
    from raeg_pl.cli import main

    # Every grid is checked through the first grid of its group: the others share every
    # section the check builds from (rows, surrogates, protector, pirates, data).
    assert main(["grid", "--config", str(REPO / first), "--check"]) == 0
    out = capsys.readouterr().out
    assert "build" in out and f"{first}: valid" in out


def test_build_groups_cover_every_grid():
    assert sorted(p for paths in BUILD_GROUPS.values() for p in paths) == sorted(GRIDS)
    assert len(BUILD_GROUPS) < len(GRIDS)


SMALL = [
    "pirates={resnet: {model: {arch: resnet_tiny_cifar}}}",
    "archs=[resnet]",
    "heldout=[]",
    "pirate_defenses=[none]",
]


@pytest.mark.parametrize(
    "override, named, error",
    [
        (
            "rows={raeg: {kind: raeg, protector: {model: {generator: nope}}}, pgd: {kind: pgd}}",
            "rows.raeg",
            "generator must be one of",
        ),
        ("rows={raeg: {kind: raeg}, pgd: {kind: pgd, eps: -1}}", "rows.pgd", "eps must be >= 0"),
        (
            "rows={raeg: {kind: raeg, protector: {model: {adv_mode: sideways}}}}",
            "rows.raeg",
            "adv_mode",
        ),
        (
            "pirates={resnet: {model: {arch: resnet_tiny_cifar, timm_kwargs: {bogus: 1}}}}",
            "pirates.resnet",
            "bogus",
        ),
    ],
)
def test_a_row_that_cannot_be_built_stops_the_grid_before_training(
    override, named, error, tmp_path, capsys
):
    from raeg_pl.cli import main

    run = tmp_path / "grid"
    args = ["grid", "--config", str(MAIN_QUICK), "--run_dir", str(run), *SMALL, override]
    assert main([*args, "--check"]) == 2
    err = capsys.readouterr().err
    line = next((x for x in err.splitlines() if x.strip().startswith(named + ":")), None)
    assert line is not None and "cannot be built" in line and error in line, err
    # A real run stops the same way, before any stage: nothing is written.
    assert main(args) == 2
    assert named in capsys.readouterr().err
    assert not run.exists()


def test_an_inference_subset_larger_than_the_test_split_stops_the_grid_before_training(
    tmp_path, capsys
):
    from raeg_pl.cli import main
    from raeg_pl.stages.check import test_class_counts

    cfg = load_grid_config(DIGITS_ABLATION)
    counts = test_class_counts(cfg["data"])
    assert counts is not None and len(counts) == 10 and sum(counts.values()) == 359
    rarest = min(counts.values())
    run = tmp_path / "grid"
    args = ["grid", "--config", str(DIGITS_ABLATION), "--run_dir", str(run), *SMALL]
    args += ["rows={full: {kind: raeg}}", f"inference_per_class={rarest + 1}"]
    assert main([*args, "--check"]) == 2
    err = capsys.readouterr().err
    assert f"has only {rarest}; set it to at most {rarest}" in err, err
    assert main(args) == 2
    assert not run.exists()
    # At the rarest class's count the same grid builds.
    assert main([*args[:-1], f"inference_per_class={rarest}", "--check"]) == 0
