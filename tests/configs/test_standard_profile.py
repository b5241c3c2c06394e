"""The standard profile (all of CIFAR-10 on a CPU, fast airbench-style pirates) is complete.

Its grid names only registered methods, defences and architectures, its pirate recipe is
the one ``experiments/pirate/standard.yaml`` trains on its own (so the clean accuracy
measured there is the clean row's), and it protects the whole training split.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from raeg_pl.config import load_config, load_grid_config, validate_grid_config
from raeg_pl.grid import Grid

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"
MAIN = EXPERIMENTS / "main" / "standard.yaml"


def test_main_standard_grid_is_valid_and_complete():
    cfg = load_grid_config(MAIN)
    assert validate_grid_config(cfg) == []
    grid = Grid(cfg)
    plan = grid.plan()
    assert plan["profile"] == "standard" and plan["table"] == "main"
    assert plan["rows"] == ["clean", "raeg_paper", "raeg_cond", "classwise_noise", "poison"]
    assert plan["seeds"] == [0, 1, 2]
    assert [d.split(":")[0] for d in plan["defenses"]] == [
        "none",
        "jpeg",
        "gray",
        "classpattern",
        "adv_train",
    ]
    assert "adv_train:eps=8," in plan["defenses"][-1]
    archs = {a: grid.pirates[a]["model"]["arch"] for a in plan["archs"]}
    assert archs == {"resnet": "resnet_air_small_cifar", "vit": "vit_micro_cifar"}
    assert cfg["run_dir"] == "runs/tables/standard"
    rows = cfg["rows"]
    assert rows["raeg_paper"]["protector"]["model"]["label_conditioned"] is False
    assert "protector" not in rows["raeg_cond"]  # the recipe's label-conditioned protector
    assert cfg["protector"]["model"]["label_conditioned"] is True


def test_standard_profile_protects_every_training_image_with_the_quick_protection_recipe():
    standard = load_config(EXPERIMENTS / "_base" / "protect_standard.yaml")
    quick = load_config(EXPERIMENTS / "_base" / "protect_quick.yaml")
    assert standard["data"]["train_per_class"] is None
    assert standard["data"]["val_per_class"] <= 100
    assert standard["surrogates"] == quick["surrogates"]
    # The quick protector fit (its images per class), which then protects every image.
    fitted = standard["protector"]
    assert fitted["data"].pop("train_per_class") == quick["data"]["train_per_class"]
    assert fitted == quick["protector"]


def test_standard_pirate_is_the_recipe_of_the_standalone_pirate_run():
    pirate = load_config(EXPERIMENTS / "_base" / "protect_standard.yaml")["pirate"]
    # The standalone file is a LightningCLI file; its defaults chain is YAML only.
    fit = load_config(EXPERIMENTS / "pirate" / "standard.yaml")
    standalone = {k: v for k, v in fit["model"].items() if k != "compile"}
    assert pirate["model"] == standalone
    assert pirate["max_epochs"] == fit["trainer"]["max_epochs"]
    assert pirate["data"]["batch_size"] == fit["data"]["batch_size"]
    assert pirate["data"]["on_device"] is True and fit["data"]["on_device"] is True
    assert fit["data"].get("train_per_class") is None


def test_standard_files_describe_their_gpu_configuration():
    for name in ("_base/protect_standard.yaml", "_base/grid_standard.yaml", "main/standard.yaml"):
        text = (EXPERIMENTS / name).read_text()
        comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
        assert "GPU configuration" in comments, name
        assert "resnet_air_cifar" in comments, name
        yaml.safe_load(text)
