"""Every repository path that `raeg --help`, README.md and the experiment READMEs name exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raeg_pl.cli import main

REPO = Path(__file__).resolve().parents[2]
# Top folders of the repository whose paths the texts name; run outputs (runs/...) and data
# folders are not in the repository and not checked.
CHECKED = ("experiments", "docs", "benchmarks", "src", "tests")
_PATH = re.compile(
    r"(?<![\w./-])((?:" + "|".join(CHECKED) + r")/[\w./{},<>*-]*)",
)


def named_paths(text: str) -> list[str]:
    """The repository paths a text names, in order, brace lists expanded.

    ``experiments/{a,b}/quick.yaml`` gives both files; placeholders (``<table>``), globs
    and ellipses (``experiments/...yaml``) are not paths and are left out; sentence
    punctuation after a path is not part of it.
    """
    out: list[str] = []
    for match in _PATH.finditer(text):
        path = match.group(1).rstrip(".,")
        if any(c in path for c in "<>*") or "..." in path:
            continue
        for expanded in _expand_braces(path):
            if expanded not in out:
                out.append(expanded)
    return out


def _expand_braces(path: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    head, tail = path[: m.start()], path[m.end() :]
    return [p for alt in m.group(1).split(",") for p in _expand_braces(head + alt + tail)]


def missing(text: str) -> list[str]:
    """The paths ``text`` names that do not exist in the repository."""
    return [p for p in named_paths(text) if not (REPO / p).exists()]


def _help_text(capsys) -> str:
    capsys.readouterr()
    assert main(["--help"]) == 0
    return capsys.readouterr().out


def _readmes() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "experiments").glob("*/README.md"))]


def test_the_checker_finds_paths_and_flags_missing_ones():
    text = (
        "raeg grid --config experiments/main_table/quick.yaml [--rows R]; see "
        "`docs/method.md`, experiments/{main,fidelity}/paper.yaml and benchmarks/. "
        "Not paths: runs/tables/quick, experiments/<table>/quick.yaml, "
        "experiments/protect/*.yaml, experiments/...yaml, ../shared/datasets."
    )
    assert named_paths(text) == [
        "experiments/main_table/quick.yaml",
        "docs/method.md",
        "experiments/main/paper.yaml",
        "experiments/fidelity/paper.yaml",
        "benchmarks/",
    ]
    assert missing(text) == ["experiments/main_table/quick.yaml"]


def test_raeg_help_names_only_existing_paths(capsys):
    text = _help_text(capsys)
    assert named_paths(text), "raeg --help names no experiment file"
    assert missing(text) == [], "raeg --help names paths that do not exist"


@pytest.mark.parametrize("readme", _readmes(), ids=lambda p: str(p.relative_to(REPO)))
def test_readme_names_only_existing_paths(readme):
    text = readme.read_text()
    assert missing(text) == [], f"{readme.relative_to(REPO)} names paths that do not exist"
