"""``raeg table``: writes every table in three formats, the plots and an index file, after
checking that the results come from one commit of a clean tree
(:mod:`~raeg_pl.tables.provenance`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

from raeg_pl.tables.archive import keep_records as archive_records
from raeg_pl.tables.builders import BUILDERS
from raeg_pl.tables.model import Table, Value
from raeg_pl.tables.plots import plot_psnr_vs_pirate, plot_robustness
from raeg_pl.tables.provenance import (
    check_provenance,
    commit_marks,
    index_lines,
    mark_cells,
    shown_path,
)
from raeg_pl.tables.records import TableError, unique
from raeg_pl.tables.renderers import to_csv, to_latex, to_markdown
from raeg_pl.tables.results import Results, load_results
from raeg_pl.utils.files import PLAN_FILE, write_atomic_text

TABLES = ("main", "fidelity", "robustness", "inference", "summary")
PLOTS = ("psnr_vs_pirate.png", "robustness.png")


def comparison_summary(table: Table) -> str:
    """A comparison table's verdicts counted (``2 win, 1 loss, 3 tie, 1 undecided (1 seed)``)."""
    counts: dict[str, int] = {}
    for row in table.rows:
        for cell in row.cells:
            if isinstance(cell, Value):
                v = str(cell.raw).rsplit(", ", 1)[0]
                counts[v] = counts.get(v, 0) + 1
    return ", ".join(f"{n} {v}" for v, n in counts.items()) or "nothing to compare yet"


def write_index(
    res: Results,
    out: Path,
    tables: list[Table],
    plots: list[str],
    marks: dict[str, str] | None = None,
) -> Path:
    """``<out>/README.md``: profile, commit, run directories, links to every table and plot,
    and the verdicts of each comparison with the class-wise control."""
    lines = [
        "# Result tables",
        "",
        f"Profile: {', '.join(res.profiles) or 'unknown (no grid.json profile)'}.",
        "",
        *index_lines(res, marks or {}),
        "",
        "Run directories:",
        "",
    ]
    for d, g in zip(res.run_dirs, res.grids, strict=True):
        what = (
            f"grid `{g.table or '?'}`, profile {g.profile or '?'}"
            if g.path.name == PLAN_FILE
            else "no grid.json (plan taken from its results)"
        )
        lines.append(f"- `{shown_path(d)}` ({what})")
    lines += [
        "",
        "| table | markdown | LaTeX | CSV | cells missing |",
        "|:--|:--|:--|:--|--:|",
    ]
    for t in tables:
        lines.append(
            f"| {t.title} | [{t.name}.md]({t.name}.md) | [{t.name}.tex]({t.name}.tex) "
            f"| [{t.name}.csv]({t.name}.csv) | {t.n_missing} of {t.n_cells} |"
        )
    comparisons = [c for t in tables for c in t.comparisons]
    if comparisons:
        lines += [
            "",
            "Against the class-wise control (a win or a loss only when the seed ranges do not"
            " overlap; lower pirate accuracy is better protection):",
            "",
        ]
        lines += [
            f"- {c.title}: {comparison_summary(c)} ([{c.name}.csv]({c.name}.csv))"
            for c in comparisons
        ]
    for p in plots:
        lines += ["", f"![{p}]({p})"]
    if res.duplicates:
        lines += ["", "Ignored (an earlier run directory gave the same run):", ""]
        lines += [f"- `{p}`" for p in res.duplicates]
    path = out / "README.md"
    write_atomic_text(path, "\n".join(lines) + "\n")
    return path


# ================================================================================== CLI
def build_all(
    run_dirs: list[str | Path],
    out: str | Path,
    tables: Iterable[str] = TABLES,
    arch: str | None = None,
    allow_mixed: bool = False,
    keep_records: str | Path | None = None,
) -> list[Path]:
    """Writes the chosen tables and plots and the index; returns the files written.

    Args:
        run_dirs: grid run directories (merged; earlier ones win on duplicate runs).
        out: output folder (created).
        tables: names from :data:`TABLES`; ``summary`` means the two plots.
        arch: architecture of the robustness table and the plots (default: the first).
        allow_mixed: build from results of several commits, of a dirty tree or of no
            recorded commit, marking the cells they make.
        keep_records: copy the plans, results and recipes the tables were built from into
            this folder, one sub-folder per run directory (:mod:`~raeg_pl.tables.archive`).

    Raises:
        TableError: unreadable inputs, or an unknown ``arch``.
        ProvenanceError: results not of one clean commit, unless ``allow_mixed``.
    """
    tables = list(tables)
    res = load_results(list(run_dirs))
    if not allow_mixed:
        check_provenance(res)
    marks = commit_marks(res)
    if arch is None:
        arch = res.archs[0] if res.archs else "?"
    elif arch not in res.archs:
        raise TableError(f"--arch {arch!r} not found; the runs hold {res.archs}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    built: list[Table] = []
    for name in unique(tables):
        if name not in BUILDERS:
            continue
        table = BUILDERS[name](res, arch)
        mark_cells(res, table, marks)
        built.append(table)
        for suffix, render in ((".md", to_markdown), (".tex", to_latex), (".csv", to_csv)):
            path = out / f"{name}{suffix}"
            write_atomic_text(path, render(table))
            written.append(path)
        for comparison in table.comparisons:
            path = out / f"{comparison.name}.csv"
            write_atomic_text(path, to_csv(comparison))
            written.append(path)
    plots: list[str] = []
    if "summary" in tables:
        plot_psnr_vs_pirate(res, arch, out / PLOTS[0])
        plot_robustness(res, arch, out / PLOTS[1])
        plots = list(PLOTS)
        written += [out / p for p in plots]
    written.append(write_index(res, out, built, plots, marks))
    if keep_records is not None:
        written += archive_records(res, keep_records)
    for p in res.duplicates:
        print(f"raeg table: warning: ignored duplicate run {p}", file=sys.stderr)
    return written


def main(args: list[str]) -> int:
    """``raeg table --runs DIR [DIR ...] --out DIR [--tables NAME ...] [--arch A]
    [--allow-mixed] [--keep-records DIR]``."""
    ap = argparse.ArgumentParser(
        prog="raeg table",
        description="Markdown, LaTeX and CSV tables and plots from grid runs' results.json files.",
    )
    ap.add_argument("--runs", nargs="+", required=True, help="grid run directories (merged)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument(
        "--tables",
        nargs="+",
        choices=TABLES,
        default=list(TABLES),
        help="tables to build (summary: the plots; default: all)",
    )
    ap.add_argument("--arch", default=None, help="architecture of robustness table and plots")
    ap.add_argument(
        "--allow-mixed",
        action="store_true",
        help="build from results of several commits, of a dirty work tree or with no commit "
        "recorded (refused by default); their cells are marked and the footnotes name them",
    )
    ap.add_argument(
        "--keep-records",
        metavar="DIR",
        default=None,
        help="also copy the grid.json, results.json and recipe.json files the tables were "
        "built from into DIR/<run folder name>/ (machine paths written as $RAEG_DATA_DIR, "
        "$RAEG_CACHE_DIR, . and ~), so the table can be rebuilt from DIR alone: commit DIR "
        "beside the table",
    )
    ns = ap.parse_args(args)
    try:
        written = build_all(
            ns.runs, ns.out, ns.tables, ns.arch, ns.allow_mixed, keep_records=ns.keep_records
        )
    except TableError as e:
        print(f"raeg table: error: {e}", file=sys.stderr)
        return 2
    print(f"raeg table: wrote {len(written)} files to {ns.out}")
    return 0
