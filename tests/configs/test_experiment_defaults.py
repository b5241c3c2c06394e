"""The experiment files resolve as they did before their recipes moved into ``_base/``.

``golden/resolved_experiments.json`` holds every experiment file's resolved config (its
``defaults`` chain merged) as it was before the protection recipes moved from
``experiments/protect/`` to ``experiments/_base/protect_*.yaml``. A deliberate change of an
experiment changes its entry; rewrite the file with ``python
tests/configs/test_experiment_defaults.py --write`` and review the diff.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from raeg_pl.config import defaults_of, load_config

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "experiments"
BASE = EXPERIMENTS / "_base"
GOLDEN = Path(__file__).with_name("golden") / "resolved_experiments.json"


def experiment_files() -> list[Path]:
    """Every config file under experiments/ (the sweeps are wandb files, not configs)."""
    return sorted(p for p in EXPERIMENTS.rglob("*.yaml") if "sweeps" not in p.parts)


def resolved() -> dict[str, dict]:
    return {p.relative_to(REPO).as_posix(): load_config(p) for p in experiment_files()}


GOLDEN_CONFIGS = json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("name", sorted(GOLDEN_CONFIGS))
def test_experiment_resolves_as_recorded(name):
    path = REPO / name
    assert path.is_file(), f"{name} is gone"
    assert load_config(path) == GOLDEN_CONFIGS[name]


def test_every_experiment_file_is_recorded():
    # The two _base/protect_*.yaml recipes are new; everything else was there before.
    new = set(resolved()) - set(GOLDEN_CONFIGS)
    assert new <= {"experiments/_base/protect_quick.yaml", "experiments/_base/protect_paper.yaml"}


def test_grids_and_the_pipeline_share_one_protection_recipe():
    for profile in ("quick", "paper"):
        recipe = load_config(BASE / f"protect_{profile}.yaml")
        protect = load_config(EXPERIMENTS / "protect" / f"{profile}.yaml")
        assert protect == {**recipe, "run_dir": f"runs/protect_{profile}"}
        assert defaults_of(BASE / f"grid_{profile}.yaml") == [f"protect_{profile}.yaml"]


def base_escapes(base: Path = BASE) -> list[str]:
    """``defaults`` entries of ``base``'s files that name a file outside ``base``."""
    out = []
    for path in sorted(base.glob("*.yaml")):
        for entry in defaults_of(path):
            target = (path.parent / entry).resolve()
            if target.parent != base.resolve():
                out.append(f"{path.name}: defaults entry {entry!r} leaves {base.name}/")
    return out


def test_presets_never_inherit_from_experiments():
    assert base_escapes() == []


def test_an_escaping_preset_is_found(tmp_path):
    base = tmp_path / "_base"
    base.mkdir()
    (base / "ok.yaml").write_text("defaults: [other.yaml]\n")
    (base / "bad.yaml").write_text("defaults: [../protect/quick.yaml]\n")
    assert base_escapes(base) == ["bad.yaml: defaults entry '../protect/quick.yaml' leaves _base/"]


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    cfgs = resolved()
    lines = [f" {json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in sorted(cfgs.items())]
    GOLDEN.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {GOLDEN} ({len(cfgs)} configs)")
