"""``raeg table`` builds only from results of one commit of a clean work tree.

Results of a dirty tree, of several commits or with no commit recorded are refused with an
error naming their run folders and commits, unless ``--allow-mixed`` is given: then the
cells they make are marked and the footnotes and the index name the commits.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from test_tables import COMMIT, grid_dir, write_json  # noqa: F401 - the fixture

from raeg_pl.cli import main as raeg_main
from raeg_pl.tables import ProvenanceError, build_all

OTHER = "fedcba9876543210"


def set_git(results: Path, git: dict | None) -> None:
    """Rewrites one results.json's git record (None: the file records none)."""
    data = json.loads(results.read_text())
    data.pop("git", None)
    if git is not None:
        data["git"] = git
    write_json(results, data)


def pgd_run(grid: Path) -> Path:
    return grid / "pirates" / "pgd" / "resnet" / "none" / "seed1" / "results.json"


def test_one_clean_commit_builds_and_the_index_states_it(grid_dir, tmp_path):  # noqa: F811
    out = tmp_path / "tables"
    build_all([grid_dir], out, ["main"])
    index = (out / "README.md").read_text()
    assert f"Commit: `{COMMIT[:12]}` (clean work tree)" in index
    assert "[c1]" not in (out / "main.md").read_text()


@pytest.mark.parametrize(
    "git, shown",
    [
        ({"commit": COMMIT, "dirty": True}, f"{COMMIT[:12]} (dirty)"),
        ({"commit": OTHER, "dirty": False}, f"{OTHER[:12]} (clean)"),
        (None, "unknown commit (no git record)"),
    ],
    ids=["dirty", "two-commits", "no-commit"],
)
def test_mixed_results_are_refused_naming_folders_and_commits(
    grid_dir,  # noqa: F811
    tmp_path,
    monkeypatch,
    capsys,
    git,
    shown,
):
    set_git(pgd_run(grid_dir), git)
    monkeypatch.chdir(grid_dir.parent)
    out = tmp_path / "tables"
    assert raeg_main(["table", "--runs", grid_dir.name, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--allow-mixed" in err
    assert f"main commit {COMMIT[:12]} (clean)" in err
    assert f"{shown}: 1 result file in:" in err
    # The offending run folder, relative to the working directory.
    assert f"\n      {grid_dir.name}/pirates/pgd/resnet/none/seed1\n" in err + "\n"
    assert str(grid_dir.resolve()) not in err
    assert not out.exists()
    with pytest.raises(ProvenanceError):
        build_all([grid_dir], out)


def test_a_dirty_method_result_is_refused_too(grid_dir, tmp_path):  # noqa: F811
    set_git(grid_dir / "methods" / "raeg_v1" / "results.json", {"commit": OTHER, "dirty": True})
    with pytest.raises(ProvenanceError, match=r"fedcba987654 \(dirty\)"):
        build_all([grid_dir], tmp_path / "tables", ["fidelity"])


def test_allow_mixed_marks_the_cells_and_names_the_commits(grid_dir, tmp_path, capsys):  # noqa: F811
    set_git(pgd_run(grid_dir), {"commit": OTHER, "dirty": True})
    set_git(grid_dir / "methods" / "pgd" / "results.json", None)
    out = tmp_path / "tables"
    args = ["table", "--runs", str(grid_dir), "--out", str(out), "--allow-mixed"]
    assert raeg_main(args) == 0

    md = (out / "main.md").read_text()
    # Markers go by file count, then first seen (methods are read before pirates): c1 is
    # pgd's method record, c2 the dirty pirate. pgd/resnet/none mixes a clean seed with the
    # dirty one: marked; its vgg cell is missing.
    assert "| pgd | 21.0 ± 1.4 (21.0) [c2] | — |" in md
    assert "| raeg_v1 | 35.0 ± 7.1 (40.0) | 50.0 (50.0) (1 seed) |" in md
    assert (
        f"unmarked cells come from {COMMIT[:12]} (clean); [c2] {OTHER[:12]} (dirty):"
        " pgd × no defence: resnet." in md
    )
    fid = (out / "fidelity.md").read_text()
    assert "| pgd | 31.00 [c1] |" in fid and "[c1] unknown commit (no git record): pgd ×" in fid
    assert "[c2]" in (out / "main.tex").read_text()
    rows = {
        r["training data"]: r for r in csv.DictReader(io.StringIO((out / "main.csv").read_text()))
    }
    assert rows["pgd"]["marked cells"] == "none/resnet [c2]"
    assert rows["raeg_v1"]["marked cells"] == ""
    index = (out / "README.md").read_text()
    assert "built with --allow-mixed" in index
    assert f"- unmarked: `{COMMIT[:12]} (clean)`" in index
    assert "- [c1]: `unknown commit (no git record)`, 1 result file" in index
    assert f"- [c2]: `{OTHER[:12]} (dirty)`, 1 result file" in index
