"""Stage recipes hash as they did before the pipeline was split into ``raeg_pl.stages``.

A run directory resumes only where each stage's recorded recipe hash (``recipe.json``)
equals the one the current code computes, so the hashes of every stage of every pipeline
and grid experiment are pinned in ``golden/stage_recipe_hashes.json`` (recorded with the
code before the split). The stages are walked in run order with their work replaced by a
stub: only the recipes are computed, nothing is trained or written but ``pipeline_config``.
A deliberate recipe change (which makes old run folders refuse to resume) rewrites the file
with ``python tests/pipeline/test_stage_recipes.py --write``; review the diff.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from raeg_pl.config import load_grid_config, load_pipeline_config
from raeg_pl.grid import Grid
from raeg_pl.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("golden") / "stage_recipe_hashes.json"
RECORDED = json.loads(GOLDEN.read_text())


class _RecipesOnly:
    """Computes and records each stage's recipe hash instead of running the stage."""

    def run_stage(self, name, fn, recipe=None):
        if recipe is not None:
            self.check_recipe(name, self.run_dir / name, recipe)
        return {"reversible": True}  # every method row also gets its authorised stages


class PipelineRecipes(_RecipesOnly, Pipeline):
    def walk(self) -> dict[str, str]:
        sur = self.surrogates()
        prot = self.protector(sur)
        self.export(prot, sur)
        self.classifiers()
        return dict(self.recipes)


class GridRecipes(_RecipesOnly, Grid):
    def check_builds(self) -> None:
        pass

    def clean_export(self) -> None:
        pass

    def write_plan(self) -> dict:
        return {}

    def walk(self) -> dict[str, str]:
        self.run()
        return dict(self.recipes)


def stage_hashes(config: str, run_dir: Path) -> dict[str, str]:
    """Every stage's recipe hash of one experiment, in run order."""
    path = REPO / config
    cfg = load_grid_config(path)
    if "table" in cfg:
        return GridRecipes(cfg, run_dir).walk()
    return PipelineRecipes(load_pipeline_config(path), run_dir).walk()


@pytest.mark.parametrize("config", sorted(RECORDED))
def test_stage_recipes_hash_as_recorded(config, tmp_path):
    hashes = stage_hashes(config, tmp_path / "run")
    expected = RECORDED[config]
    assert sorted(hashes) == sorted(expected)
    changed = sorted(k for k in expected if hashes.get(k) != expected[k])
    assert changed == [], f"{config}: stages whose recipe hash changed: {changed[:10]}"


def test_a_changed_recipe_changes_the_hashes(tmp_path):
    config = "experiments/protect/quick.yaml"
    base = stage_hashes(config, tmp_path / "a")
    cfg = load_pipeline_config(REPO / config, ["pirate.model.lr=0.1"])
    changed = PipelineRecipes(cfg, tmp_path / "b").walk()
    differ = sorted(k for k in base if base[k] != changed[k])
    assert differ == ["authorized", "clean_gray", "clean_jpeg_q75", "clean_none"] + [
        "pirate_gray",
        "pirate_jpeg_q75",
        "pirate_none",
    ]


def test_an_optional_term_named_at_its_default_is_the_recipe_without_it(tmp_path):
    config = "experiments/protect/quick.yaml"
    base = stage_hashes(config, tmp_path / "a")

    def walk(name, *overrides):
        cfg = load_pipeline_config(REPO / config, list(overrides))
        return PipelineRecipes(cfg, tmp_path / name).walk()

    assert walk("off", "protector.model.l_unroll=0.0", "protector.model.unroll_steps=2") == base
    on = walk("on", "protector.model.l_unroll=0.1")
    assert on["protector"] != base["protector"] and on["surrogate_0"] == base["surrogate_0"]
    # Only the optional terms: a core argument named at its default is still named.
    assert walk("core", "protector.model.clamp=1.0")["protector"] != base["protector"]


def test_optional_terms_are_protector_arguments_that_default_to_off():
    import inspect

    from raeg_pl.lit.protector import OPTIONAL_TERM_ARGS, ProtectorLitModule

    params = inspect.signature(ProtectorLitModule.__init__).parameters
    assert set(OPTIONAL_TERM_ARGS) <= set(params)
    assert all(params[k].default == 0 for k in OPTIONAL_TERM_ARGS if k.startswith("l_"))


def test_the_default_protector_is_the_ablation_row_it_was_chosen_from():
    # make train, the main grids' RAEG-C row and the ablation's measured row are one fit.
    for profile in ("quick", "paper"):
        default = RECORDED[f"experiments/protect/{profile}.yaml"]["protector"]
        row = RECORDED[f"experiments/ablation/{profile}.yaml"]["protector_inverse_adversary_steps4"]
        main = RECORDED[f"experiments/main/{profile}.yaml"]["protector_raeg_cond"]
        assert default == row == main
        assert RECORDED[f"experiments/ablation/{profile}.yaml"]["protector_full"] != default


def test_every_pipeline_and_grid_experiment_is_pinned():
    tables = ("main", "robustness", "fidelity", "inference", "ablation", "protect")
    expected = {f"experiments/{t}/{p}.yaml" for t in tables for p in ("quick", "paper")}
    assert set(RECORDED) == expected


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = {c: stage_hashes(c, Path(tmp) / c.replace("/", "_")) for c in sorted(RECORDED)}
    GOLDEN.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
