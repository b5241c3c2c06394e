"""``raeg table --keep-records``: the small files a table is built from, kept beside it, so a
fresh checkout rebuilds (and extends) the committed table without the run directories."""

from __future__ import annotations

import json
from pathlib import Path

from test_tables import COMMIT, grid_dir, write_json, write_pirate  # noqa: F401 - the fixture

from raeg_pl.cli import main as raeg_main
from raeg_pl.tables import build_all
from raeg_pl.tables.archive import keep_records, scrub
from raeg_pl.tables.results import load_results


def all_text(folder: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(folder.rglob("*.json")))


def test_records_rebuild_the_same_tables(grid_dir, tmp_path):  # noqa: F811
    recipe = grid_dir / "pirates" / "pgd" / "resnet" / "none" / "seed0" / "recipe.json"
    write_json(recipe, {"hash": "abc", "recipe": {"stage": "pirate"}})
    first, records = tmp_path / "t1", tmp_path / "records"
    written = build_all([grid_dir], first, ["main", "robustness", "fidelity"], keep_records=records)
    kept = records / grid_dir.name
    assert kept / "grid.json" in written
    assert (kept / "pirates" / "pgd" / "resnet" / "none" / "seed0" / "recipe.json").is_file()
    n_results = len(list(grid_dir.rglob("results.json")))
    assert len(list(kept.rglob("results.json"))) == n_results
    # Only the small files: no checkpoint or image travels.
    assert {p.name for p in kept.rglob("*") if p.is_file()} == {
        "grid.json",
        "results.json",
        "recipe.json",
    }
    second = tmp_path / "t2"
    build_all([kept], second, ["main", "robustness", "fidelity"])
    for name in ("main.md", "robustness.csv", "fidelity.csv", "main.tex"):
        assert (second / name).read_text() == (first / name).read_text(), name


def test_records_name_no_machine_folder(grid_dir, tmp_path, monkeypatch):  # noqa: F811
    data_root = tmp_path / "datasets"
    data_root.mkdir()
    monkeypatch.setenv("RAEG_DATA_DIR", str(data_root))
    monkeypatch.chdir(tmp_path)
    res_file = grid_dir / "pirates" / "pgd" / "resnet" / "none" / "seed1" / "results.json"
    data = json.loads(res_file.read_text())
    data["data"] = {"root": str(data_root / "cifar10"), "cache": str(tmp_path / "cache" / "x")}
    write_json(res_file, data)
    assert (
        raeg_main(
            ["table", "--runs", grid_dir.name, "--out", "tables", "--keep-records", "records"]
        )
        == 0
    )
    kept = json.loads(
        (tmp_path / "records" / grid_dir.name / res_file.relative_to(grid_dir)).read_text()
    )
    assert kept["data"] == {"root": "$RAEG_DATA_DIR/cifar10", "cache": "./cache/x"}
    assert str(tmp_path) not in all_text(tmp_path / "records")
    # What the tables read is unchanged.
    assert kept["test_acc"] == data["test_acc"] and kept["git"] == data["git"]


def test_scrub_matches_whole_path_components_only():
    tokens = [("/data/x", "$RAEG_DATA_DIR")]
    assert scrub({"a": ["/data/x/y", "/data/xy", "/data/x"]}, tokens) == {
        "a": ["$RAEG_DATA_DIR/y", "/data/xy", "$RAEG_DATA_DIR"]
    }


def test_records_extend_across_sessions(grid_dir, tmp_path):  # noqa: F811
    """Session 1 keeps its records; session 2, on a machine without session 1's runs, runs
    one more cell and rebuilds the table from the records plus its own run."""
    records = tmp_path / "records"
    build_all([grid_dir], tmp_path / "t1", ["main"], keep_records=records)
    kept = records / grid_dir.name
    # A later session's run directory of the same name (another machine), one new cell and
    # one duplicate of a kept cell.
    later = tmp_path / "later" / grid_dir.name
    write_pirate(later, "pgd", "vgg", "none", 0, 0.31)
    write_pirate(later, "pgd", "resnet", "none", 0, 0.99)
    before = {p: p.read_text() for p in kept.rglob("*.json")}
    out = tmp_path / "t2"
    build_all([kept, later], out, ["main"], keep_records=records)
    # The kept records were read back, not copied into themselves, and are unchanged.
    assert {p: p.read_text() for p in kept.rglob("*.json")} == before
    # The new cell is kept in its own folder; the duplicate (ignored by the table) is not.
    new_folder = records / f"{grid_dir.name}-2"
    assert (new_folder / "pirates" / "pgd" / "vgg" / "none" / "seed0" / "results.json").is_file()
    assert not (new_folder / "pirates" / "pgd" / "resnet").exists()
    md = (out / "main.md").read_text()
    assert "31.0" in md and "99.0" not in md
    # Keeping again writes nothing new.
    res = load_results([kept, later])
    assert keep_records(res, records) == []


def test_kept_records_are_read_by_stage_name_and_bad_folders_are_named(grid_dir, tmp_path):  # noqa: F811
    import pytest

    from raeg_pl.tables.archive import read_kept, record_folders
    from raeg_pl.tables.records import TableError

    recipe = grid_dir / "pirates" / "pgd" / "resnet" / "none" / "seed0" / "recipe.json"
    write_json(recipe, {"hash": "abc123", "recipe": {}})
    records = tmp_path / "records"
    build_all([grid_dir], tmp_path / "t", ["main"], keep_records=records)
    # The records root and the folder itself name the same records.
    assert record_folders([records]) == record_folders([records / grid_dir.name])
    kept = read_kept([records])
    assert kept["pirates/pgd/resnet/none/seed0"] == (
        records / grid_dir.name / "pirates" / "pgd" / "resnet" / "none" / "seed0",
        "abc123",
    )
    assert kept["methods/raeg_v1"][1] is None  # kept without a recipe: never taken as done
    with pytest.raises(TableError, match="records folder not found: .*nowhere"):
        read_kept([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TableError, match="empty: holds no kept records"):
        read_kept([tmp_path / "empty"])
    (records / grid_dir.name / recipe.relative_to(grid_dir)).write_text("{not json")
    with pytest.raises(TableError, match="recipe.json: cannot read the kept recipe"):
        read_kept([records])
