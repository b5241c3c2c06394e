"""`make tables` builds the tables of the grids it ran, from the folders those grids write."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from raeg_pl.config import load_grid_config

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _table_commands(*make_args: str) -> list[str]:
    """The `raeg table` commands of `make -n tables ...` (a dry run: nothing is trained)."""
    out = subprocess.run(
        ["make", "-n", "--no-print-directory", "tables", *make_args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.strip() for line in out.splitlines() if re.search(r"raeg table\b", line)]


def _runs_of(command: str) -> str:
    return re.search(r"--runs (\S+)", command).group(1)


@pytest.mark.parametrize(
    ("tables", "profile"),
    [
        ("main robustness fidelity inference", "quick"),
        ("ablation", "quick"),
        ("main ablation", "quick"),
        ("ablation", "paper"),
        ("main robustness", "paper"),
    ],
)
def test_tables_are_built_from_the_run_folders_of_the_grids_that_ran(tables, profile):
    commands = _table_commands(f"TABLES={tables}", f"PROFILE={profile}")
    expected = {
        load_grid_config(ROOT / "experiments" / t / f"{profile}.yaml")["run_dir"]
        for t in tables.split()
    }
    # One table build per run folder the grids wrote, and none for a folder no grid wrote (a
    # `raeg table` of a missing folder fails the target after hours of training).
    assert sorted(_runs_of(c) for c in commands) == sorted(expected)
