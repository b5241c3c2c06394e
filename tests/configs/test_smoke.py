"""Every experiment file runs one step of every stage through the real CLI, on fake data.

A tiny synthetic ImageFolder (the ``fake_data`` fixture) replaces CIFAR-10, so this runs in
every test run with no data and no GPU. Each file is run as its README says (``raeg fit``,
``raeg pipeline`` or ``raeg grid``) with one small set of overrides per kind of file: the
fake data and tiny per-class counts, one batch per training / validation / test loop, one
optimiser step, one CPU process in fp32. Grids keep every row, every pirate architecture and
every pirate defence of the file, so each is built and trained once; the seeds are cut to
one and each method's iteration counts (PGD steps, error-minimising rounds) to one. The
``_base/`` presets are covered through the files that name them; sweeps are checked by
``test_sweeps.py``. The real-data version, ``test_configs.py``, is marked ``data``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from raeg_pl.cli import expand_config_args, main
from raeg_pl.grid import Grid, load_grid_config
from raeg_pl.pipeline import deep_merge, load_pipeline_config

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"
# Folders of presets and sweeps, not experiments.
NOT_EXPERIMENTS = ("_base", "sweeps", "smoke")


def _kind(path: Path) -> str:
    """``fit`` (a LightningCLI classifier file), ``pipeline`` or ``grid``."""
    args = expand_config_args(["--config", str(path)])
    cfg: dict = {}
    for text in args[1::2]:
        cfg = deep_merge(cfg, yaml.safe_load(text) or {})
    if "table" in cfg:
        return "grid"
    if "protector" in cfg or "surrogates" in cfg:
        return "pipeline"
    return "fit"


CONFIGS = sorted(p for p in EXPERIMENTS.rglob("*.yaml") if not set(NOT_EXPERIMENTS) & set(p.parts))
KINDS = {p: _kind(p) for p in CONFIGS}


def _id(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_every_experiment_folder_is_smoke_tested():
    """Both profiles of every experiment are found (a new folder is picked up by the glob)."""
    folders = {p.parent.name for p in CONFIGS}
    expected = {
        "protect",
        "surrogate",
        "pirate",
        "main",
        "fidelity",
        "robustness",
        "inference",
        "ablation",
    }
    assert expected <= folders, sorted(expected - folders)
    for folder in folders:
        names = {p.name for p in CONFIGS if p.parent.name == folder}
        assert {"quick.yaml", "paper.yaml"} <= names, (folder, sorted(names))


# The paper files' GPU (accelerator: gpu, bf16) becomes one CPU process in fp32 (bf16
# autocast works on CPU but is slow on CPUs without bf16 units); one batch in each loop and
# one optimiser step: `max_steps` caps the per-stage `max_epochs` of every stage, whatever
# the file sets. Every stage's Trainer takes the `trainer:` section, so no code is involved.
# RAEG_SMOKE_ACCELERATOR=gpu runs the same steps on one CUDA device in bf16 autocast, the
# paper files' precision (a check of the CUDA paths on a GPU machine; CI runs on CPUs).
ACCELERATOR = os.environ.get("RAEG_SMOKE_ACCELERATOR", "cpu")
PRECISION = "32-true" if ACCELERATOR == "cpu" else "bf16-mixed"
PIPELINE_TRAINER = [
    f"trainer.accelerator={ACCELERATOR}",
    "trainer.devices=1",
    "trainer.strategy=auto",
    f"trainer.precision={PRECISION}",
    "trainer.max_steps=1",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
]


def pipeline_overrides(fake_root: Path, cache: Path) -> list[str]:
    """The overrides every pipeline and grid file takes for a smoke run on the fake data."""
    return [
        f"data.data_dir={fake_root}",
        "data.dataset=fake",
        f"data.cache_dir={cache}",
        "data.download=false",
        "data.train_per_class=2",
        "data.val_per_class=1",
        "data.test_per_class=1",
        "pirate.data.val_per_class=1",
        *PIPELINE_TRAINER,
        # The adversarial term, the defence curriculum and the PSNR controller act from the
        # first step, so the one step exercises them.
        "protector.model.warmup_steps=0",
        "protector.model.adv_ramp_steps=1",
        "wandb=null",
    ]


GRID_EXTRA = [
    "seeds=[0]",
    "inference_per_class=1",
    # Never pick up a real run of the working tree (`make train`'s runs/protect_quick).
    "reuse_from=null",
]


def fit_args(config: Path, fake_root: Path, cache: Path, run: Path) -> list[str]:
    """``raeg fit`` arguments of a smoke run of a classifier file.

    The GPU, DDP and ``torch.compile`` choices of the paper files are swapped for one plain
    CPU process (compiling would take longer than the step).
    """
    return [
        "fit",
        "--config",
        str(config),
        "--trainer.accelerator",
        ACCELERATOR,
        "--trainer.devices",
        "1",
        "--trainer.strategy",
        "auto",
        "--trainer.precision",
        PRECISION,
        "--model.compile",
        "false",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "1",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.limit_test_batches",
        "1",
        "--data.data_dir",
        str(fake_root),
        "--data.dataset",
        "fake",
        "--data.cache_dir",
        str(cache),
        "--data.download",
        "false",
        "--data.train_per_class",
        "2",
        "--data.val_per_class",
        "1",
        "--data.test_per_class",
        "1",
        "--run_dir",
        str(run),
    ]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on batches of a few images, a second thread costs more than it
    saves, and far more when other processes share the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smoke_cache(tmp_path_factory) -> Path:
    """Decoded-tensor cache of the fake data, shared by every smoke run."""
    return tmp_path_factory.mktemp("smoke_cache")


def _results(path: Path) -> dict:
    assert path.is_file(), f"{path} missing"
    return json.loads(path.read_text())


@pytest.mark.parametrize("config", [p for p in CONFIGS if KINDS[p] == "fit"], ids=_id)
def test_fit_file_runs_one_step(config, fake_data, smoke_cache, tmp_path):
    run = tmp_path / "run"
    assert main(fit_args(config, fake_data, smoke_cache, run)) == 0
    res = _results(run / "results.json")
    assert res["global_step"] == 1
    assert res["splits"] == {"train": 6, "val": 3, "test": 3}
    assert 0.0 <= res["metrics"]["test/acc"] <= 1.0
    assert (run / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("config", [p for p in CONFIGS if KINDS[p] == "pipeline"], ids=_id)
def test_pipeline_file_runs_one_step_per_stage(config, fake_data, smoke_cache, tmp_path):
    run = tmp_path / "run"
    args = ["pipeline", "--config", str(config), "--run_dir", str(run)]
    cfg = load_pipeline_config(config)
    overrides = [*pipeline_overrides(fake_data, smoke_cache), *protector_overrides(cfg)]
    assert main([*args, *overrides]) == 0
    res = _results(run / "results.json")
    assert set(res["pirate_acc_by_defense"]) == set(cfg["pirate_defenses"])
    assert res["splits"]["protected_train"] == 6 and res["splits"]["test"] == 3
    assert len(res["surrogate_test_acc"]) == len(cfg["surrogates"])
    stages = [f"surrogate_{i}" for i in range(len(cfg["surrogates"]))]
    stages += ["protector", "authorized"]
    for stage in stages:
        assert _results(run / stage / "results.json"), stage
    assert (run / "report.md").is_file()
    shutil.rmtree(run)  # checkpoints of paper-sized networks: do not keep them around


def protector_overrides(cfg: dict) -> list[str]:
    """The protector's own images per class (the standard profile fits it on a subset), cut
    to the fake data's count."""
    protector_data = (cfg.get("protector") or {}).get("data") or {}
    return ["protector.data.train_per_class=2"] if "train_per_class" in protector_data else []


# Iteration counts of the protection methods (PGD steps, error-minimising rounds...): one each.
METHOD_ITERATIONS = ("steps", "rounds", "pgd_steps", "train_steps")


def method_overrides(cfg: dict) -> list[str]:
    """``rows.<row>.<count>=1`` for every iteration count each row's method takes."""
    import importlib
    import inspect

    from raeg_pl.methods import METHODS

    out = []
    for row, spec in (cfg.get("rows") or {}).items():
        kind = deep_merge(cfg.get("method_defaults") or {}, spec or {})["kind"]
        module, cls = METHODS[kind].split(":")
        takes = inspect.signature(getattr(importlib.import_module(module), cls)).parameters
        out += [f"rows.{row}.{key}=1" for key in METHOD_ITERATIONS if key in takes]
    return out


def defence_overrides(cfg: dict) -> list[str]:
    """Learned-inverse pirates with as few leaked pairs as the fake data holds, one step.

    ``inverse:k=K`` refuses a training split of fewer than K images (a real pirate cannot
    leak pairs it does not have), so the i-th one becomes ``inverse:k=<i+1>,steps=1``.
    """
    defenses = list(cfg.get("pirate_defenses") or [])
    inverses = [d for d in defenses if d.split(":")[0] == "inverse"]
    if not inverses:
        return []
    small = {d: f"inverse:k={i + 1},steps=1" for i, d in enumerate(inverses)}
    return [f"pirate_defenses={json.dumps([small.get(d, d) for d in defenses])}"]


@pytest.fixture(scope="module")
def grid_root(tmp_path_factory):
    """Where the smoke grids run; removed afterwards (paper-sized checkpoints add up)."""
    root = tmp_path_factory.mktemp("grids")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("config", [p for p in CONFIGS if KINDS[p] == "grid"], ids=_id)
def test_grid_file_runs_every_row_arch_and_defence(config, fake_data, smoke_cache, grid_root):
    """Every method row, pirate architecture and pirate defence of a table is run once.

    The grid trains the product rows x archs x defences; its cells are independent stages,
    so two runs into one grid folder cover each factor without the product: first every
    architecture after every defence on one row's data (the clean baseline), then every
    row with the first architecture and defence (plus the authorised models). The second
    run skips what the first finished, as a resumed grid does. As in ``make tables``, the
    tables of one profile share their grid folder (the file's ``run_dir``), so a stage
    another table of the profile has already run (same recipe) is reused, not rerun.
    """
    overrides = [*pipeline_overrides(fake_data, smoke_cache), *GRID_EXTRA]
    overrides += method_overrides(load_grid_config(config, overrides))
    overrides += protector_overrides(load_grid_config(config, overrides))
    overrides += defence_overrides(load_grid_config(config, overrides))
    cfg = load_grid_config(config, overrides)
    run = grid_root / cfg["run_dir"]
    grid = Grid(cfg, run)
    args = ["grid", "--config", str(config), "--run_dir", str(run), *overrides]
    first = grid.pirate_rows[:1]
    assert main([*args, f"pirate_rows={json.dumps(first)}"]) == 0
    if len(grid.pirate_rows) > 1:
        archs = list(dict.fromkeys([grid.archs[0], *grid.authorized_archs]))
        # The resumed run skips the build check, as a worker of a checked grid does: the
        # first run checked the same rows and pirates (a minute for the paper ablation).
        resume = [*args, "--worker", "--archs", *archs, "--defenses", grid.defenses[0]]
        assert main(resume) == 0

    plan = json.loads((run / "grid.json").read_text())["tables"][grid.table]
    assert plan["rows"] == ["clean", *grid.rows]
    reversible = set()
    for row in grid.rows:
        res = _results(run / "methods" / row / "results.json")
        assert res["exported_images"] == 6, row
        if res["reversible"]:
            reversible.add(row)
    # Every pirate stage's results carry its cell of the grid (and the table that ran it).
    cells = []
    for path in (run / "pirates").rglob("results.json"):
        res = _results(path)
        assert res["splits"]["train"] > 0 and len(res["history"]) == 1, path
        g = res["grid"]
        cells.append((g["row"], g["arch"], g["defense"], g["source"], g["table"]))
    trained = {row for row, _, _, source, _ in cells if source != "recovered"}
    assert set(grid.pirate_rows) <= trained
    if grid.pirate_rows:
        assert set(grid.archs) <= {arch for _, arch, _, _, _ in cells}
        assert set(grid.defenses) <= {defense for _, _, defense, _, _ in cells}
    for arch in grid.heldout:
        assert any(c[:4] == ("clean", arch, "none", "clean") for c in cells), arch
    authorized = {row for row, _, _, source, _ in cells if source == "recovered"}
    assert reversible & set(grid.pirate_rows) <= authorized
    # A table that trains no pirates (fidelity, inference) trains only its held-out models.
    own = {(row, arch, source) for row, arch, _, source, table in cells if table == grid.table}
    if not grid.pirate_rows:
        assert own <= {("clean", arch, "clean") for arch in grid.heldout}
