"""``raeg table``: writes every table in three formats, the plots and an index file."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

from raeg_pl.tables.builders import BUILDERS
from raeg_pl.tables.model import Table
from raeg_pl.tables.plots import plot_psnr_vs_pirate, plot_robustness
from raeg_pl.tables.records import TableError, unique
from raeg_pl.tables.renderers import to_csv, to_latex, to_markdown
from raeg_pl.tables.results import Results, load_results
from raeg_pl.utils.files import write_atomic_text

TABLES = ("main", "fidelity", "robustness", "inference", "summary")
PLOTS = ("psnr_vs_pirate.png", "robustness.png")


def shown_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it, else as given.

    A table index committed with a repository then names its run folders relative to the
    checkout, never by an absolute path of the machine that built it.
    """
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def write_index(res: Results, out: Path, tables: list[Table], plots: list[str]) -> Path:
    """``<out>/README.md``: profile, run directories, and links to every table and plot."""
    lines = [
        "# Result tables",
        "",
        f"Profile: {', '.join(res.profiles) or 'unknown (no grid.json profile)'}.",
        "",
        "Run directories:",
        "",
    ]
    for d, g in zip(res.run_dirs, res.grids, strict=True):
        what = (
            f"grid `{g.table or '?'}`, profile {g.profile or '?'}"
            if g.path.name == "grid.json"
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
    for p in plots:
        lines += ["", f"![{p}]({p})"]
    if res.commits:
        lines += [
            "",
            "Git commits of the runs: "
            + ", ".join(f"`{c}` ({n} files)" for c, n in res.commits.items())
            + ".",
        ]
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
) -> list[Path]:
    """Writes the chosen tables and plots and the index; returns the files written.

    Args:
        run_dirs: grid run directories (merged; earlier ones win on duplicate runs).
        out: output folder (created).
        tables: names from :data:`TABLES`; ``summary`` means the two plots.
        arch: architecture of the robustness table and the plots (default: the first).

    Raises:
        TableError: unreadable inputs, or an unknown ``arch``.
    """
    tables = list(tables)
    res = load_results(list(run_dirs))
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
        built.append(table)
        for suffix, render in ((".md", to_markdown), (".tex", to_latex), (".csv", to_csv)):
            path = out / f"{name}{suffix}"
            write_atomic_text(path, render(table))
            written.append(path)
    plots: list[str] = []
    if "summary" in tables:
        plot_psnr_vs_pirate(res, arch, out / PLOTS[0])
        plot_robustness(res, arch, out / PLOTS[1])
        plots = list(PLOTS)
        written += [out / p for p in plots]
    written.append(write_index(res, out, built, plots))
    for p in res.duplicates:
        print(f"raeg table: warning: ignored duplicate run {p}", file=sys.stderr)
    return written


def main(args: list[str]) -> int:
    """``raeg table --runs DIR [DIR ...] --out DIR [--tables NAME ...] [--arch A]``."""
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
    ns = ap.parse_args(args)
    try:
        written = build_all(ns.runs, ns.out, ns.tables, ns.arch)
    except TableError as e:
        print(f"raeg table: error: {e}", file=sys.stderr)
        return 2
    print(f"raeg table: wrote {len(written)} files to {ns.out}")
    return 0
