"""Paper tables and plots built from the runs' ``results.json`` files alone.

``raeg table --runs DIR [DIR ...] --out OUT`` reads one or more grid run directories::

    DIR/grid.json                                              the grid's plan
    DIR/methods/<row>/results.json                             one protection method
    DIR/pirates/<row>/<arch>/<defense>/seed<k>/results.json    one pirate training run

and writes, for each table, ``OUT/<name>.md``, ``OUT/<name>.tex`` (booktabs) and
``OUT/<name>.csv``, the plots ``OUT/psnr_vs_pirate.png`` and ``OUT/robustness.png``, and an
index ``OUT/README.md``. Tables:

- ``main``:       pirate clean-test accuracy per training-data row and architecture, final
                  mean +- std over seeds (peak mean), no defence plus grayscale and JPEG-10
                  groups when such runs exist, and an authorised row per reversible method;
- ``fidelity``:   distortion of the protected images and quality of their recovery;
- ``robustness``: pirate accuracy per pirate defence for one architecture;
- ``inference``:  surrogate and held-out classifiers on protected test images per defence;
- ``summary``:    the two plots.

Any file may be missing (a grid still running, a failed run): its cells show as "—" and are
counted in each table's footnote. Several run directories are merged; row, architecture and
defence order come from the ``grid.json`` files (first seen), else from the results. The
aggregation is plain Python; matplotlib is imported only to draw the plots.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raeg_pl.utils.files import write_atomic, write_atomic_text

CLEAN = "clean"
NO_DEFENSE = "none"
MISSING_TEXT = "—"
NA_TEXT = "n/a"
TABLES = ("main", "fidelity", "robustness", "inference", "summary")
PLOTS = ("psnr_vs_pirate.png", "robustness.png")
SOURCES = ("protected", "recovered", "clean")


class TableError(ValueError):
    """Raised when the run directories cannot be turned into tables (named file or folder)."""


# ======================================================================= reading results
@dataclass
class GridPlan:
    """One ``grid.json``: the rows, architectures, defences and seeds a grid runs.

    Attributes:
        path: the ``grid.json`` file, or the run directory when it has none (then the lists
            are what its results contain).
        table: the grid's table name (``main``, ``robustness``, ``ablation``, ...).
        profile: ``quick`` or ``paper`` (None when unknown).
        rows: training-data rows in table order; ``clean`` is the clean-data baseline.
        methods: each method row's spec (``{"kind": "pgd", "eps": 6}``).
        archs: pirate architectures.
        defenses: pirate defences (``none``, ``gray``, ``jpeg:q=10``, ...).
        seeds: pirate seeds.
        eval_defenses: defences applied to protected test images at inference.
        heldout: clean-trained architectures evaluated on protected test images.
        authorized_archs: architectures of the authorised runs (None: all).
        pirate_rows: rows whose pirates are trained (None: all).
        parts: one plan per table when the grid folder is shared by several tables
            (``grid.json``'s ``tables`` entry); the merged lists above are their union, and
            only the parts' own products of rows, architectures, defences and seeds are
            planned cells.
    """

    path: Path
    table: str | None = None
    profile: str | None = None
    rows: list[str] = field(default_factory=list)
    methods: dict[str, Any] = field(default_factory=dict)
    archs: list[str] = field(default_factory=list)
    defenses: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    eval_defenses: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    authorized_archs: list[str] | None = None
    pirate_rows: list[str] | None = None
    parts: list[GridPlan] = field(default_factory=list)


@dataclass(frozen=True)
class PirateRun:
    """One pirate (or authorised, or clean-baseline) training run's clean-test accuracy.

    Attributes:
        row: the training-data row (the method's row for authorised runs; ``clean``).
        source: ``protected``, ``recovered`` (authorised) or ``clean``.
        arch: the classifier architecture.
        defense: the pirate's defence applied to its training images.
        seed: the training seed.
        test_acc: final clean-test accuracy, fraction in [0, 1].
        test_acc_peak: best clean-test accuracy over epochs, fraction (None if not recorded).
        path: the ``results.json`` it came from.
        commit: the git commit the run was made at (None if not recorded).
    """

    row: str
    source: str
    arch: str
    defense: str
    seed: int
    test_acc: float
    test_acc_peak: float | None
    path: Path
    commit: str | None = None


CellKey = tuple[str, str, str, str]  # (row, source, arch, defense)


@dataclass
class Results:
    """Everything read from the run directories, merged.

    Attributes:
        run_dirs: the run directories, as given.
        grids: one plan per run directory.
        rows: training-data rows, ``clean`` first, then grid order, then rows found only
            in results.
        archs, defenses, eval_defenses, heldout: union of the grids' lists (first seen
            order), then values found only in results.
        methods: validated method results by row.
        pirates: pirate runs by cell key, then by seed.
        planned: the cells some grid plans (or that hold data), each with its planned seeds.
        duplicates: ``results.json`` files ignored because an earlier run directory already
            gave the same cell and seed.
        commits: git commit (suffixed ``+dirty`` for uncommitted changes) -> number of files.
    """

    run_dirs: list[Path]
    grids: list[GridPlan]
    rows: list[str]
    archs: list[str]
    defenses: list[str]
    eval_defenses: list[str]
    heldout: list[str]
    methods: dict[str, dict[str, Any]]
    pirates: dict[CellKey, dict[int, PirateRun]]
    planned: dict[CellKey, set[int]]
    duplicates: list[Path] = field(default_factory=list)
    commits: dict[str, int] = field(default_factory=dict)

    @property
    def method_rows(self) -> list[str]:
        """Rows that are protection methods (every row but the clean baseline)."""
        return [r for r in self.rows if r != CLEAN]

    @property
    def profiles(self) -> list[str]:
        """The grids' profiles, first seen order."""
        return _unique(g.profile for g in self.grids if g.profile)

    def reversible(self, row: str) -> bool | None:
        """Whether a method restores its images (None when nothing says)."""
        rev = self.methods.get(row, {}).get("reversible")
        if rev is not None:
            return rev
        if any(k[0] == row and k[1] == "recovered" for k in self.pirates):
            return True
        return None


def _source(row: str) -> str:
    """The training-data source of a row's pirates (the clean row trains on clean data)."""
    return CLEAN if row == CLEAN else "protected"


def _unique(items: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TableError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise TableError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _number(data: dict, key: str, path: Path, fraction: bool = False) -> float | None:
    """``data[key]`` as a float; None when absent or null; TableError naming ``path`` if bad."""
    v = data.get(key)
    if v is None:
        return None
    if not _is_number(v):
        raise TableError(f"{path}: field {key!r} must be a number or null, got {v!r}")
    v = float(v)
    # Accuracies are fractions; a value like 41.0 means a writer stored percent.
    if fraction and not math.isnan(v) and not 0.0 <= v <= 1.0:
        raise TableError(f"{path}: field {key!r} = {v} is not a fraction in [0, 1]")
    return v


def _fraction_map(data: dict, key: str, path: Path) -> dict[str, float | None]:
    v = data.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise TableError(f"{path}: field {key!r} must be an object, got {type(v).__name__}")
    return {str(k): _number(v, k, path, fraction=True) for k in v}


def _str_list(data: dict, key: str, path: Path) -> list[str]:
    v = data.get(key)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TableError(f"{path}: field {key!r} must be a list of strings, got {v!r}")
    return list(v)


def _load_grid(path: Path) -> GridPlan:
    data = _read_json(path)
    per_table = data.get("tables") or {}
    if not isinstance(per_table, dict) or not all(isinstance(t, dict) for t in per_table.values()):
        raise TableError(f"{path}: field 'tables' must map table names to grid plans")
    plan = _plan_from(data, path)
    plan.parts = [_plan_from(t, path) for t in per_table.values()]
    return plan


def _plan_from(data: dict, path: Path) -> GridPlan:
    seeds = data.get("seeds") or []
    if not isinstance(seeds, list) or not all(_is_number(s) and int(s) == s for s in seeds):
        raise TableError(f"{path}: field 'seeds' must be a list of integers, got {seeds!r}")
    methods = data.get("methods") or {}
    if not isinstance(methods, dict):
        raise TableError(f"{path}: field 'methods' must be an object")
    return GridPlan(
        path=path,
        table=data.get("table"),
        profile=data.get("profile"),
        rows=_str_list(data, "rows", path),
        methods=methods,
        archs=_str_list(data, "archs", path),
        defenses=_str_list(data, "defenses", path),
        seeds=[int(s) for s in seeds],
        eval_defenses=_str_list(data, "eval_defenses", path),
        heldout=_str_list(data, "heldout", path),
        authorized_archs=_str_list(data, "authorized_archs", path)
        if data.get("authorized_archs") is not None
        else None,
        pirate_rows=_str_list(data, "pirate_rows", path)
        if data.get("pirate_rows") is not None
        else None,
    )


def _commit(data: dict) -> str | None:
    git = data.get("git")
    if isinstance(git, dict) and git.get("commit"):
        return str(git["commit"])[:12] + ("+dirty" if git.get("dirty") else "")
    if isinstance(data.get("git_commit"), str):
        return data["git_commit"][:12]
    return None


def _load_method(path: Path) -> dict[str, Any]:
    """A method's ``results.json``, validated: fractions, dB values, per-defence maps."""
    data = _read_json(path)
    grid = data.get("grid") if isinstance(data.get("grid"), dict) else {}
    rev = data.get("reversible")
    if rev is not None and not isinstance(rev, bool):
        raise TableError(f"{path}: field 'reversible' must be true or false, got {rev!r}")
    out: dict[str, Any] = {
        "row": str(grid.get("row") or path.parent.name),
        "reversible": rev,
        "path": path,
        "commit": _commit(data),
    }
    for key in ("psnr_protected", "ssim_protected", "linf_protected", "l2_protected"):
        out[key] = _number(data, key, path)
    for key in ("psnr_recovered", "ssim_recovered"):
        out[key] = _number(data, key, path)
    for key in ("exact_pixel_rate_recovered", "surrogate_acc_clean"):
        out[key] = _number(data, key, path, fraction=True)
    out["surrogate_acc_protected_by_defense"] = _fraction_map(
        data, "surrogate_acc_protected_by_defense", path
    )
    out["heldout_acc_clean"] = _fraction_map(data, "heldout_acc_clean", path)
    by_arch = data.get("heldout_acc_protected_by_defense") or {}
    if not isinstance(by_arch, dict):
        raise TableError(f"{path}: field 'heldout_acc_protected_by_defense' must be an object")
    out["heldout_acc_protected_by_defense"] = {
        str(arch): _fraction_map(by_arch, arch, path) for arch in by_arch
    }
    return out


def _norm(name: str) -> str:
    """A defence spec or folder slug reduced to letters and digits (``jpeg:q=7.5`` -> ``jpegq7p5``)."""
    return re.sub(r"[^a-z0-9]", "", name.lower().replace(".", "p"))


def _load_pirate(path: Path, pirates_dir: Path, known_defenses: list[str]) -> PirateRun | None:
    """A pirate run's ``results.json``; None for a file that is not one (no ``grid`` record
    and not at ``pirates/<row>/<arch>/<defense>/seed<k>/results.json``)."""
    data = _read_json(path)
    grid = data.get("grid")
    parts = path.relative_to(pirates_dir).parts
    if isinstance(grid, dict):
        if grid.get("kind") not in (None, "pirate"):
            return None
        try:
            row, arch, defense = str(grid["row"]), str(grid["arch"]), str(grid["defense"])
            seed = grid["seed"]
        except KeyError as e:
            raise TableError(f"{path}: 'grid' record lacks {e.args[0]!r}") from e
        source = str(grid.get("source") or (CLEAN if row == CLEAN else "protected"))
    elif len(parts) == 5 and re.fullmatch(r"seed-?\d+", parts[3]):
        row, arch, slug = parts[0], parts[1], parts[2]
        seed = int(parts[3].removeprefix("seed").removeprefix("-"))
        if _norm(slug) in ("authorized", "authorised"):
            source, defense = "recovered", NO_DEFENSE
        else:
            source = CLEAN if row == CLEAN else "protected"
            # Folder names hold a slug of the defence; map it back to the grid's spelling.
            defense = next((d for d in known_defenses if _norm(d) == _norm(slug)), slug)
    else:
        return None
    if source not in SOURCES:
        raise TableError(f"{path}: 'grid.source' must be one of {SOURCES}, got {source!r}")
    if not _is_number(seed) or int(seed) != seed:
        raise TableError(f"{path}: 'grid.seed' must be an integer, got {seed!r}")
    acc = _number(data, "test_acc", path, fraction=True)
    if acc is None:
        raise TableError(f"{path}: pirate results lack 'test_acc'")
    return PirateRun(
        row=row,
        source=source,
        arch=arch,
        defense=defense,
        seed=int(seed),
        test_acc=acc,
        test_acc_peak=_number(data, "test_acc_peak", path, fraction=True),
        path=path,
        commit=_commit(data),
    )


def load_results(run_dirs: list[str | Path]) -> Results:
    """Reads and merges the grids' plans and results.

    Args:
        run_dirs: grid run directories; earlier ones win when two give the same run.

    Returns:
        The merged :class:`Results`.

    Raises:
        TableError: a directory is missing or holds nothing of a grid, or a file is
            malformed (the message names it).
    """
    if not run_dirs:
        raise TableError("no run directories given")
    dirs = [Path(d) for d in run_dirs]
    grids: list[GridPlan] = []
    methods: dict[str, dict[str, Any]] = {}
    pirates: dict[CellKey, dict[int, PirateRun]] = {}
    duplicates: list[Path] = []
    commits: dict[str, int] = {}
    per_dir_runs: list[list[PirateRun]] = []
    per_dir_methods: list[list[str]] = []
    for d in dirs:
        if not d.is_dir():
            raise TableError(f"run directory not found: {d}")
        grid_file = d / "grid.json"
        method_files = sorted((d / "methods").glob("*/results.json"))
        pirate_files = sorted((d / "pirates").rglob("results.json"))
        if not grid_file.is_file() and not method_files and not pirate_files:
            raise TableError(
                f"{d}: no grid.json and no results (expected methods/<row>/results.json or "
                "pirates/<row>/<arch>/<defense>/seed<k>/results.json); is this a grid run "
                "directory?"
            )
        plan = _load_grid(grid_file) if grid_file.is_file() else GridPlan(path=d)
        grids.append(plan)
        known = _unique(x for g in grids for x in g.defenses)
        rows_here: list[str] = []
        for f in method_files:
            m = _load_method(f)
            rows_here.append(m["row"])
            if m["row"] in methods:
                duplicates.append(f)
                continue
            methods[m["row"]] = m
            if m["commit"]:
                commits[m["commit"]] = commits.get(m["commit"], 0) + 1
        runs_here: list[PirateRun] = []
        for f in pirate_files:
            run = _load_pirate(f, d / "pirates", known)
            if run is None:
                continue
            runs_here.append(run)
            cell = pirates.setdefault((run.row, run.source, run.arch, run.defense), {})
            if run.seed in cell:
                duplicates.append(f)
                continue
            cell[run.seed] = run
            if run.commit:
                commits[run.commit] = commits.get(run.commit, 0) + 1
        per_dir_runs.append(runs_here)
        per_dir_methods.append(rows_here)

    all_runs = [r for runs in per_dir_runs for r in runs]
    rows = _unique(
        [
            *(r for g in grids for r in g.rows),
            *(r for rows_here in per_dir_methods for r in rows_here),
            *(r.row for r in all_runs),
        ]
    )
    if CLEAN in rows:
        rows = [CLEAN, *(r for r in rows if r != CLEAN)]
    archs = _unique([*(a for g in grids for a in g.archs), *(r.arch for r in all_runs)])
    defenses = _unique([*(x for g in grids for x in g.defenses), *(r.defense for r in all_runs)])
    eval_defenses = _unique(
        [
            *(x for g in grids for x in g.eval_defenses),
            *(x for m in methods.values() for x in m["surrogate_acc_protected_by_defense"]),
            *(
                x
                for m in methods.values()
                for by_def in m["heldout_acc_protected_by_defense"].values()
                for x in by_def
            ),
        ]
    )
    heldout = _unique(
        [
            *(a for g in grids for a in g.heldout),
            *(
                a
                for m in methods.values()
                for a in [*m["heldout_acc_clean"], *m["heldout_acc_protected_by_defense"]]
            ),
        ]
    )
    res = Results(
        run_dirs=dirs,
        grids=grids,
        rows=rows,
        archs=archs,
        defenses=defenses,
        eval_defenses=eval_defenses,
        heldout=heldout,
        methods=methods,
        pirates=pirates,
        planned={},
        duplicates=duplicates,
        commits=commits,
    )
    for plan, runs_here, rows_here in zip(grids, per_dir_runs, per_dir_methods, strict=True):
        _add_plan(res, plan, runs_here, rows_here)
    for key, by_seed in pirates.items():
        res.planned.setdefault(key, set()).update(by_seed)
    return res


def _add_plan(res: Results, plan: GridPlan, runs: list[PirateRun], method_rows: list[str]) -> None:
    """Adds the pirate cells one grid runs (with their seeds) to ``res.planned``.

    A directory without ``grid.json`` plans the product of the rows, architectures,
    defences and seeds its own results contain.
    """
    if plan.parts:
        for part in plan.parts:
            _add_plan(res, part, runs, method_rows)
        return
    rows = plan.rows or _unique([*method_rows, *(r.row for r in runs)])
    archs = plan.archs or _unique(r.arch for r in runs)
    defenses = plan.defenses or _unique(r.defense for r in runs)
    seeds = set(plan.seeds or (r.seed for r in runs))
    pirate_rows = rows if plan.pirate_rows is None else plan.pirate_rows
    auth_archs = archs if plan.authorized_archs is None else plan.authorized_archs

    def want(key: CellKey) -> None:
        res.planned.setdefault(key, set()).update(seeds)

    for row in rows:
        if row not in pirate_rows:
            # Such a grid still trains the clean classifiers that serve as held-out models.
            for arch in plan.heldout if row == CLEAN else []:
                want((CLEAN, CLEAN, arch, NO_DEFENSE))
            continue
        for arch in archs:
            for d in defenses:
                want((row, _source(row), arch, d))
        if row != CLEAN and res.reversible(row):
            for arch in auth_archs:
                want((row, "recovered", arch, NO_DEFENSE))


# ========================================================================= table model
@dataclass(frozen=True)
class Stat:
    """A cell aggregated over seeds; accuracies as fractions.

    Attributes:
        mean: mean final accuracy.
        std: sample standard deviation (ddof=1); None with one seed.
        n: number of seeds found.
        n_planned: number of seeds the grids plan for the cell.
        peak: mean peak accuracy over the seeds that record one (None if none do).
    """

    mean: float
    std: float | None
    n: int
    n_planned: int
    peak: float | None = None


@dataclass(frozen=True)
class Value:
    """A single-number cell: its display text and the raw value written to CSV."""

    text: str
    raw: float | str


class _NotApplicable:
    """A cell no grid plans and no result fills (an irreversible method's recovery, ...)."""

    def __repr__(self) -> str:
        return "NA"


NA = _NotApplicable()
Cell = Stat | Value | _NotApplicable | None  # None: planned but missing


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; None for a single value) of ``values``."""
    if not values:
        raise ValueError("mean_std of no values")
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) >= 2 else None)


def pct(v: float) -> str:
    """A fraction as a percentage with one decimal (``0.4137`` -> ``41.4``)."""
    return f"{100 * v:.1f}"


@dataclass
class Column:
    """A table column.

    Attributes:
        key: the CSV field stem, unique in the table (``none/resnet``).
        label: the header text.
        group: a header spanning adjacent columns with the same group (None: no group).
        kind: ``stat`` (mean +- std), ``stat_peak`` (plus peak mean) or ``value``.
    """

    key: str
    label: str
    group: str | None = None
    kind: str = "value"

    @property
    def csv_fields(self) -> list[str]:
        """The CSV header fields this column expands to."""
        if self.kind == "value":
            return [self.key]
        stems = ["mean", "std", "n_seeds"] + (["peak_mean"] if self.kind == "stat_peak" else [])
        return [f"{self.key} {s}" for s in stems]


@dataclass
class Row:
    """A table row: label cells, data cells, and whether a rule separates it from the last.

    ``shown_labels`` replaces ``labels`` in markdown and LaTeX (a group's label written
    once); CSV always repeats the full labels.
    """

    labels: list[str]
    cells: list[Cell]
    rule_before: bool = False
    shown_labels: list[str] | None = None


@dataclass
class Table:
    """A rendered-format-independent table: headers, rows, notes and missing-cell counts."""

    name: str
    title: str
    label_headers: list[str]
    columns: list[Column]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)

    @property
    def n_cells(self) -> int:
        """Cells that some grid plans (or that hold a result)."""
        return sum(c is not NA for r in self.rows for c in r.cells)

    @property
    def n_missing(self) -> int:
        """Planned cells with no result."""
        return sum(c is None for r in self.rows for c in r.cells)

    @property
    def n_short(self) -> int:
        """Cells with fewer seeds than planned."""
        return sum(isinstance(c, Stat) and c.n < c.n_planned for r in self.rows for c in r.cells)

    def footnotes(self) -> list[str]:
        """The footnote lines: missing-cell count first, then the table's own notes."""
        lines = [f"{self.n_missing} of {self.n_cells} cells missing ({MISSING_TEXT})."]
        if any(c is NA for r in self.rows for c in r.cells):
            lines.append(f"{NA_TEXT}: not applicable, or not part of any grid.")
        if self.n_short:
            lines.append(f"{self.n_short} cells have fewer seeds than planned (marked).")
        return lines + self.notes


def format_cell(cell: Cell, column: Column) -> str:
    """A cell's display text (plain Unicode; LaTeX escaping happens when rendering)."""
    if cell is None:
        return MISSING_TEXT
    if cell is NA:
        return NA_TEXT
    if isinstance(cell, Value):
        return cell.text
    assert isinstance(cell, Stat)
    text = pct(cell.mean) if cell.std is None else f"{pct(cell.mean)} ± {pct(cell.std)}"
    if column.kind == "stat_peak" and cell.peak is not None:
        text += f" ({pct(cell.peak)})"
    if cell.n == 1:
        text += " (1 seed)"
    elif cell.n < cell.n_planned:
        text += f" ({cell.n} of {cell.n_planned} seeds)"
    return text


def _csv_values(cell: Cell, column: Column) -> list[str]:
    width = len(column.csv_fields)
    if cell is None or cell is NA:
        return [""] * width
    if isinstance(cell, Value):
        return [str(cell.raw)]
    assert isinstance(cell, Stat)
    r = lambda v: "" if v is None else f"{100 * v:.4f}"  # noqa: E731
    out = [r(cell.mean), r(cell.std), str(cell.n)]
    return out + [r(cell.peak)] if column.kind == "stat_peak" else out


# =========================================================================== renderers
def to_markdown(table: Table) -> str:
    """The table as GitHub markdown with its title and footnotes."""

    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    header = [*table.label_headers]
    header += [f"{c.group}: {c.label}" if c.group else c.label for c in table.columns]
    lines = [
        f"# {table.title}",
        "",
        "| " + " | ".join(esc(h) for h in header) + " |",
        "|" + "|".join([":--"] * len(table.label_headers) + ["--:"] * len(table.columns)) + "|",
    ]
    for row in table.rows:
        labels = row.shown_labels if row.shown_labels is not None else row.labels
        cells = [format_cell(c, col) for c, col in zip(row.cells, table.columns, strict=True)]
        lines.append("| " + " | ".join(esc(x) for x in [*labels, *cells]) + " |")
    lines.append("")
    lines += [f"- {note}" for note in table.footnotes()]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "—": "---",
}


def latex_escape(text: str) -> str:
    """``text`` with LaTeX's special characters escaped (``_`` -> ``\\_``, ``±`` -> ``$\\pm$``)."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def _groups(columns: list[Column]) -> list[tuple[str | None, int]]:
    """Runs of adjacent columns sharing a group, as (group, width)."""
    out: list[tuple[str | None, int]] = []
    for c in columns:
        if out and out[-1][0] == c.group:
            out[-1] = (c.group, out[-1][1] + 1)
        else:
            out.append((c.group, 1))
    return out


def to_latex(table: Table) -> str:
    """The table as a LaTeX ``table`` float with a booktabs ``tabular`` and footnotes."""
    n_lab = len(table.label_headers)
    # A space between column groups keeps the spec readable; LaTeX ignores it.
    spec = "l" * n_lab + " ".join("r" * width for _, width in _groups(table.columns))
    lines = [
        "% Generated by `raeg table` from results.json files; needs \\usepackage{booktabs}.",
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{latex_escape(table.title)}}}",
        f"\\label{{tab:{table.name}}}",
        "\\small",
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
    ]
    groups = _groups(table.columns)
    if any(g is not None for g, _ in groups):
        spans, rules, col = [""] * n_lab, [], n_lab + 1
        for g, width in groups:
            if g is None:
                spans += [""] * width
            else:
                spans.append(f"\\multicolumn{{{width}}}{{c}}{{{latex_escape(g)}}}")
                rules.append(f"\\cmidrule(lr){{{col}-{col + width - 1}}}")
            col += width
        lines.append(" & ".join(spans) + " \\\\")
        lines.append(" ".join(rules))
    header = [*table.label_headers, *(c.label for c in table.columns)]
    lines.append(" & ".join(latex_escape(h) for h in header) + " \\\\")
    lines.append("\\midrule")
    for row in table.rows:
        if row.rule_before:
            lines.append("\\midrule")
        labels = row.shown_labels if row.shown_labels is not None else row.labels
        cells = [format_cell(c, col) for c, col in zip(row.cells, table.columns, strict=True)]
        lines.append(" & ".join(latex_escape(x) for x in [*labels, *cells]) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "", "\\smallskip"]
    lines.append("{\\footnotesize " + " ".join(latex_escape(n) for n in table.footnotes()) + "}")
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """The table as CSV: label columns, then each column's numeric fields (percent for
    accuracies, empty when missing); one line per row, labels repeated."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*table.label_headers, *(f for c in table.columns for f in c.csv_fields)])
    for row in table.rows:
        values = [
            v for c, col in zip(row.cells, table.columns, strict=True) for v in _csv_values(c, col)
        ]
        w.writerow([*row.labels, *values])
    return buf.getvalue()


# ============================================================================ builders
def pirate_stat(res: Results, row: str, source: str, arch: str, defense: str) -> Cell:
    """The seed-aggregated cell of pirate runs (None: planned but no run; NA: not planned)."""
    key = (row, source, arch, defense)
    runs = res.pirates.get(key)
    if not runs:
        return None if key in res.planned else NA
    ordered = [runs[s] for s in sorted(runs)]
    mean, std = mean_std([r.test_acc for r in ordered])
    peaks = [r.test_acc_peak for r in ordered if r.test_acc_peak is not None]
    return Stat(
        mean=mean,
        std=std,
        n=len(ordered),
        n_planned=max(len(res.planned.get(key, ())), len(ordered)),
        peak=statistics.fmean(peaks) if peaks else None,
    )


def _is_gray(d: str) -> bool:
    return _norm(d) in ("gray", "grey", "grayscale", "greyscale")


def _is_jpeg10(d: str) -> bool:
    return re.fullmatch(r"jpeg(q|quality)?10", _norm(d)) is not None


def _defense_label(d: str) -> str:
    return "no defence" if d == NO_DEFENSE else d


def build_main(res: Results) -> Table:
    """Pirate clean-test accuracy per row and architecture; no defence, grayscale, JPEG-10."""
    present = {k[3] for k in res.pirates}
    groups = [NO_DEFENSE]
    groups += [d for d in res.defenses if d in present and _is_gray(d)][:1]
    groups += [d for d in res.defenses if d in present and _is_jpeg10(d)][:1]
    grouped = len(groups) > 1
    columns = [
        Column(f"{d}/{a}", a, _defense_label(d) if grouped else None, "stat_peak")
        for d in groups
        for a in res.archs
    ]
    rows = [
        Row(
            [row],
            [pirate_stat(res, row, _source(row), a, d) for d in groups for a in res.archs],
        )
        for row in res.rows
    ]
    first = True
    for row in res.method_rows:
        if res.reversible(row):
            cells = [pirate_stat(res, row, "recovered", a, d) for d in groups for a in res.archs]
            rows.append(Row([f"{row} (authorised)"], cells, rule_before=first))
            first = False
    return Table(
        name="main",
        title="Pirate accuracy on the clean test set (%)",
        label_headers=["training data"],
        columns=columns,
        rows=rows,
        notes=[
            "Cells: final accuracy mean ± std over seeds (mean peak accuracy over epochs).",
            "Rows: classifiers trained from scratch on each method's protected training set"
            f" (clean: on the clean set){'' if not grouped else ', after the named defence'};"
            " authorised: trained on the method's restored images.",
        ],
    )


def _fmt(v: float | None, spec: str, scale: float = 1.0) -> Value | None:
    return None if v is None else Value(format(scale * v, spec), round(scale * v, 6))


def build_fidelity(res: Results) -> Table:
    """Distortion of the protected images and quality of their recovery, per method."""
    columns = [
        Column("psnr_protected", "PSNR prot. (dB)"),
        Column("ssim_protected", "SSIM prot."),
        Column("linf_protected", "L-inf prot."),
        Column("l2_protected", "L2 prot."),
        Column("psnr_recovered", "PSNR rec. (dB)"),
        Column("ssim_recovered", "SSIM rec."),
        Column("exact_pixel_rate_recovered", "exact pixels rec. (%)"),
        Column("reversible", "reversible"),
    ]
    rows = []
    for row in res.method_rows:
        m = res.methods.get(row)
        if m is None:
            rows.append(Row([row], [None] * len(columns)))
            continue
        rev = m["reversible"]
        recovery = [
            _fmt(m["psnr_recovered"], ".2f"),
            _fmt(m["ssim_recovered"], ".4f"),
            _fmt(m["exact_pixel_rate_recovered"], ".2f", 100.0),
        ]
        if rev is False:
            recovery = [NA if c is None else c for c in recovery]
        cells: list[Cell] = [
            _fmt(m["psnr_protected"], ".2f"),
            _fmt(m["ssim_protected"], ".4f"),
            _fmt(m["linf_protected"], ".1f"),
            _fmt(m["l2_protected"], ".1f"),
            *recovery,
            None if rev is None else Value("yes" if rev else "no", "yes" if rev else "no"),
        ]
        rows.append(Row([row], cells))
    return Table(
        name="fidelity",
        title="Fidelity of the protected images and their recovery",
        label_headers=["method"],
        columns=columns,
        rows=rows,
        notes=[
            "Measured from the stored 8-bit files; L-inf and L2: per-image norms of the"
            " protected-minus-original difference in 8-bit levels, averaged over images.",
        ],
    )


def build_robustness(res: Results, arch: str) -> Table:
    """Pirate final accuracy per pirate defence for one architecture."""
    columns = [Column(d, _defense_label(d), None, "stat") for d in res.defenses]
    rows = [
        Row([row], [pirate_stat(res, row, _source(row), arch, d) for d in res.defenses])
        for row in res.rows
    ]
    return Table(
        name="robustness",
        title=f"Pirate accuracy on the clean test set after each pirate defence, {arch} (%)",
        label_headers=["training data"],
        columns=columns,
        rows=rows,
        notes=[
            "Cells: final accuracy mean ± std over seeds; the pirate applies the column's"
            " defence to every training image before training."
        ],
    )


def build_inference(res: Results) -> Table:
    """Surrogate and held-out classifiers' accuracy on protected test images per defence."""
    heldout = res.heldout
    columns = [Column("clean", "clean images")] + [
        Column(d, _defense_label(d), "protected images", "value") for d in res.eval_defenses
    ]

    def value(v: float | None) -> Cell:
        return None if v is None else Value(pct(v), round(100 * v, 4))

    rows = []
    for i, row in enumerate(res.method_rows):
        m = res.methods.get(row)
        lines: list[tuple[str, list[Cell]]] = []
        if m is None:
            lines.append(("surrogate", [None] * len(columns)))
            lines += [(f"held-out {a}", [None] * len(columns)) for a in heldout]
        else:
            sur = m["surrogate_acc_protected_by_defense"]
            # A method that only protects a training set (it needs the labels or the whole
            # set) records no test-time figures: its protected columns do not apply.
            applies = bool(sur) or any(m["heldout_acc_protected_by_defense"].values())

            def protected(by_def: dict[str, float | None], applies: bool = applies) -> list[Cell]:
                return [value(by_def.get(d)) if applies else NA for d in res.eval_defenses]

            lines.append(("surrogate", [value(m["surrogate_acc_clean"]), *protected(sur)]))
            for a in heldout:
                by_def = m["heldout_acc_protected_by_defense"].get(a, {})
                lines.append(
                    (f"held-out {a}", [value(m["heldout_acc_clean"].get(a)), *protected(by_def)])
                )
        for j, (who, cells) in enumerate(lines):
            rows.append(
                Row(
                    [row, who],
                    cells,
                    rule_before=(i > 0 and j == 0),
                    shown_labels=[row if j == 0 else "", who],
                )
            )
    return Table(
        name="inference",
        title="Classifier accuracy on protected test images (%)",
        label_headers=["method", "classifier"],
        columns=columns,
        rows=rows,
        notes=[
            "Surrogate: the classifier the method attacks; held-out: classifiers trained on"
            " clean data that the method never saw. Column: defence applied to the protected"
            " test images before classification (clean images: no protection)."
        ],
    )


BUILDERS: dict[str, Callable[[Results, str], Table]] = {
    "main": lambda res, arch: build_main(res),
    "fidelity": lambda res, arch: build_fidelity(res),
    "robustness": build_robustness,
    "inference": lambda res, arch: build_inference(res),
}


# =============================================================================== plots
def _save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    write_atomic(path, buf.getvalue())


def plot_psnr_vs_pirate(res: Results, arch: str, path: Path) -> int:
    """Scatter of protected-image PSNR against pirate accuracy (no defence), one point per
    method, with the clean-data accuracy as a horizontal line. Returns the points drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    n = 0
    for row in res.method_rows:
        psnr = res.methods.get(row, {}).get("psnr_protected")
        stat = pirate_stat(res, row, "protected", arch, NO_DEFENSE)
        if psnr is None or not isinstance(stat, Stat):
            continue
        ax.errorbar(psnr, 100 * stat.mean, yerr=100 * (stat.std or 0.0), fmt="o", capsize=3)
        ax.annotate(row, (psnr, 100 * stat.mean), textcoords="offset points", xytext=(5, 4))
        n += 1
    clean = pirate_stat(res, CLEAN, CLEAN, arch, NO_DEFENSE)
    if isinstance(clean, Stat):
        ax.axhline(100 * clean.mean, color="gray", linestyle="--", label="clean training data")
        ax.legend(loc="best", fontsize=8)
    if n == 0:
        ax.text(
            0.5,
            0.5,
            "no method with both PSNR and pirate results yet",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    ax.set(
        xlabel="PSNR of protected images (dB)",
        ylabel="pirate clean-test accuracy (%)",
        title=f"Distortion vs protection ({arch}, no pirate defence)",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return n


def plot_robustness(res: Results, arch: str, path: Path) -> int:
    """Grouped bars of pirate accuracy per pirate defence (groups) and row (bars), with
    seed standard deviations. Returns the bars drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    defs = res.defenses or [NO_DEFENSE]
    rows = res.rows
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(defs) + 2), 4.2))
    width = 0.8 / max(1, len(rows))
    n = 0
    for i, row in enumerate(rows):
        xs, ys, errs = [], [], []
        for j, d in enumerate(defs):
            stat = pirate_stat(res, row, _source(row), arch, d)
            if isinstance(stat, Stat):
                xs.append(j - 0.4 + (i + 0.5) * width)
                ys.append(100 * stat.mean)
                errs.append(100 * (stat.std or 0.0))
        if xs:
            ax.bar(xs, ys, width, yerr=errs, capsize=2, label=row)
            n += len(xs)
    ax.set_xticks(range(len(defs)), [_defense_label(d) for d in defs], rotation=30, ha="right")
    ax.set(ylabel="pirate clean-test accuracy (%)", title=f"Pirate defences ({arch})")
    if n:
        ax.legend(fontsize=7, ncol=2)
    else:
        ax.text(0.5, 0.5, "no pirate results yet", ha="center", va="center", transform=ax.transAxes)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return n


# ================================================================================ index
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
        lines.append(f"- `{d.resolve()}` ({what})")
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
    for name in _unique(tables):
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
