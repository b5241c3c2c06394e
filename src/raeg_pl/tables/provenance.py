"""Provenance of the tables: the git commit every result file records, checked as one.

Tables are built from results of a single commit of a clean work tree. Results of several
commits, of a dirty tree or with no commit recorded (``unknown``) are refused with an error
naming their run folders, unless ``raeg table --allow-mixed`` is given: then every cell
made of results other than those of the main commit carries a marker (``[c1]``), and each
table's footnote names the commits behind the markers and the cells they mark.
"""

from __future__ import annotations

from pathlib import Path

from raeg_pl.tables.model import Table, cell_commits
from raeg_pl.tables.records import UNKNOWN_COMMIT, TableError
from raeg_pl.tables.results import Results

#: Run folders named per commit in the refusal message.
SHOWN_FOLDERS = 12


class ProvenanceError(TableError):
    """The results come from several commits, a dirty work tree or an unknown commit."""


def shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, else as given.

    A table index committed with a repository then names its run folders relative to the
    checkout, never by an absolute path of the machine that built it.
    """
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def describe(commit: str) -> str:
    """A provenance in words: ``1a2b3c4d5e6f (clean)``, ``... (dirty)`` or unknown."""
    if commit == UNKNOWN_COMMIT:
        return "unknown commit (no git record)"
    sha, dirty = commit.removesuffix("+dirty"), commit.endswith("+dirty")
    return f"{sha} ({'dirty' if dirty else 'clean'})"


def is_clean(commit: str) -> bool:
    """Whether a provenance is a known commit of a clean work tree."""
    return commit != UNKNOWN_COMMIT and not commit.endswith("+dirty")


def main_commit(res: Results) -> str | None:
    """The clean commit most result files come from (None when no file has one)."""
    clean = [c for c in res.sources if is_clean(c)]
    return max(clean, key=lambda c: len(res.sources[c])) if clean else None


def is_mixed(res: Results) -> bool:
    """Whether the results are anything but one clean commit's."""
    return len(res.sources) > 1 or any(not is_clean(c) for c in res.sources)


def check_provenance(res: Results) -> None:
    """Refuses results of several commits, of a dirty tree or of an unknown commit.

    Raises:
        ProvenanceError: naming each offending commit and its run folders (relative to
            the working directory), and the main commit when there is one.
    """
    if not is_mixed(res):
        return
    main = main_commit(res)
    lines = [
        "the results do not come from one commit of a clean work tree; rerun the"
        " offending runs at one clean commit, or pass --allow-mixed to build the tables"
        " with their cells marked."
    ]
    if main is not None:
        lines.append(f"main commit {describe(main)}: {files(len(res.sources[main]))}")
    for commit, paths in res.sources.items():
        if commit == main:
            continue
        folders = [shown_path(f.parent) for f in paths]
        more = len(folders) - SHOWN_FOLDERS
        lines.append(f"{describe(commit)}: {files(len(paths))} in:")
        lines += [f"    {f}" for f in folders[:SHOWN_FOLDERS]]
        if more > 0:
            lines.append(f"    ... and {more} more")
    raise ProvenanceError("\n  ".join(lines))


def commit_marks(res: Results) -> dict[str, str]:
    """Provenance -> marker (``c1``, ``c2``, ...) of every provenance but the main commit,
    most result files first; empty when the results are one clean commit's."""
    if not is_mixed(res):
        return {}
    main = main_commit(res)
    others = sorted((c for c in res.sources if c != main), key=lambda c: -len(res.sources[c]))
    return {c: f"c{i}" for i, c in enumerate(others, start=1)}


def mark_cells(res: Results, table: Table, marks: dict[str, str]) -> None:
    """Sets ``marks`` on ``table`` and its comparisons and adds the footnote that names
    each marker's commit and the cells it marks."""
    if not marks:
        return
    for t in (table, *table.comparisons):
        t.marks = marks
        marked: dict[str, list[str]] = {}
        for row in t.rows:
            for cell, col in zip(row.cells, t.columns, strict=True):
                for c in cell_commits(cell):
                    if c in marks:
                        head = f"{col.group}: {col.label}" if col.group else col.label
                        marked.setdefault(c, []).append(f"{' / '.join(row.labels)} × {head}")
        if not marked:
            continue
        main = main_commit(res)
        parts = [
            "Results of several commits (built with --allow-mixed):"
            + (f" unmarked cells come from {describe(main)};" if main else "")
        ]
        for c, m in marks.items():
            cells = marked.get(c)
            if cells:
                parts.append(f"[{m}] {describe(c)}: {', '.join(cells)};")
        t.notes.append(" ".join(parts).rstrip(";") + ".")


def index_lines(res: Results, marks: dict[str, str]) -> list[str]:
    """The index's provenance paragraph: the single commit, or every commit and marker."""
    if not res.sources:
        return ["Commit: none (no result files yet)."]
    if not marks:
        (commit,) = res.sources
        return [f"Commit: `{commit}` (clean work tree); every result file records it."]
    lines = [
        "Commits: the results come from several commits (built with --allow-mixed);"
        " marked cells name theirs:",
        "",
    ]
    main = main_commit(res)
    if main is not None:
        lines.append(f"- unmarked: `{describe(main)}`, {files(len(res.sources[main]))}")
    for c, m in marks.items():
        lines.append(f"- [{m}]: `{describe(c)}`, {files(len(res.sources[c]))}")
    return lines


def files(n: int) -> str:
    """``n`` result file(s) in words."""
    return f"{n} result file{'' if n == 1 else 's'}"


__all__ = [
    "ProvenanceError",
    "check_provenance",
    "commit_marks",
    "describe",
    "index_lines",
    "is_mixed",
    "main_commit",
    "mark_cells",
    "shown_path",
]
