"""A grid pirate's seed sets its initialisation, its data order and its validation split.

The classifier fit itself is replaced by a stub that records what the grid passes it; the
data module is then built from that record on a small synthetic ImageFolder, so the test
checks the real split and the real on-device order each seed gets.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import raeg_pl.stages.common as common
from raeg_pl.data.datamodule import ImageClassificationDataModule
from raeg_pl.grid import Grid

CLASSES = ("cat", "dog")


def write_folder(root: Path, per_class: int) -> Path:
    """``root/{train,test}/<class>/*.png``: 8x8 RGB images of random pixels."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", 4)):
        for cls in CLASSES:
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    return root


@pytest.fixture()
def fits(tmp_path, monkeypatch) -> list[dict]:
    """The (data config, global seed) of every classifier fit, recorded instead of run."""
    calls: list[dict] = []

    def record(stage_dir, model_cfg, data_cfg, trainer_cfg, max_epochs, seed, *a, **k):
        calls.append({"data": data_cfg, "seed": seed})
        return {}

    monkeypatch.setattr(common, "train_classifier", record)
    return calls


def make_grid(run_dir: Path, data: dict) -> Grid:
    cfg = {
        "table": "main",
        "rows": {"pgd": {"kind": "pgd"}},
        "pirate": {"max_epochs": 1, "model": {"arch": "resnet_tiny_cifar"}},
        "pirate_defenses": ["none"],
        "seeds": [0, 1],
        "data": data,
    }
    return Grid(cfg, run_dir)


def split_and_order(root: Path, data_cfg: dict, cache: Path) -> tuple[list[int], list[int]]:
    """The validation indices and the first epoch's on-device training order."""
    dm = ImageClassificationDataModule(
        **{**data_cfg, "data_dir": str(root), "cache_dir": str(cache), "download": False}
    )
    dm.setup()
    order = dm.train_dataloader().sampler.order()
    return dm.val_indices.tolist(), order.tolist()


def test_seed_changes_init_split_and_order_and_the_same_seed_repeats_them(tmp_path, fits):
    root = write_folder(tmp_path / "data" / "toy", per_class=40)
    data = {"dataset": "toy", "val_per_class": 10, "batch_size": 8, "on_device": True}
    grid = make_grid(tmp_path / "run", data)
    for seed in (0, 1):
        grid.pirate_stage("clean", "pirate", "none", seed, "clean")
    again = make_grid(tmp_path / "run_again", data)
    again.pirate_stage("clean", "pirate", "none", 0, "clean")

    assert [f["seed"] for f in fits] == [100, 101, 100]
    assert [f["data"]["seed"] for f in fits] == [0, 1, 0]
    got = []
    for f in fits:
        cfg = {**f["data"], "train_dir": str(root / "train")}
        got.append(split_and_order(tmp_path / "data", cfg, tmp_path / "cache"))
    (val0, order0), (val1, order1), (val0_again, order0_again) = got
    assert len(val0) == len(val1) == 2 * 10
    assert val0 != val1 and order0 != order1
    assert val0 == val0_again and order0 == order0_again

    # The recipe follows: seed 1's differs in its data seed, seed 0's is the config's.
    recipes = grid.recipes
    assert (
        recipes["pirates/clean/pirate/none/seed0"]
        == again.recipes["pirates/clean/pirate/none/seed0"]
    )
    assert recipes["pirates/clean/pirate/none/seed0"] != recipes["pirates/clean/pirate/none/seed1"]
    seed0 = grid.classifier_recipe(grid.pirates["pirate"], 100, "clean", "none", None, 0)
    assert seed0["data"] == data


def test_data_seed_counts_from_the_configs(tmp_path, fits):
    grid = make_grid(tmp_path / "run", {"dataset": "toy", "seed": 5})
    grid.pirate_stage("clean", "pirate", "none", 0, "clean")
    grid.pirate_stage("clean", "pirate", "none", 2, "clean")
    assert [f["data"]["seed"] for f in fits] == [5, 7]
    rec = grid.classifier_recipe(grid.pirates["pirate"], 102, "clean", "none", None, 7)
    assert rec["data"]["seed"] == 7
