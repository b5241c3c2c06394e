"""Result loading: the grids' plans and results of one or more run directories, merged
(:func:`load_results`) into the cells each table reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raeg_pl.tables.records import (
    CLEAN,
    NO_DEFENSE,
    UNKNOWN_COMMIT,
    CellKey,
    GridPlan,
    PirateRun,
    TableError,
    load_grid,
    load_method,
    load_pirate,
    source_of,
    unique,
)
from raeg_pl.utils.files import PLAN_FILE, RESULTS_FILE


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
        sources: provenance (git commit as in ``commits``, or ``unknown`` for a file that
            records none) -> the result files read from it.
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
    sources: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def method_rows(self) -> list[str]:
        """Rows that are protection methods (every row but the clean baseline)."""
        return [r for r in self.rows if r != CLEAN]

    @property
    def profiles(self) -> list[str]:
        """The grids' profiles, first seen order."""
        return unique(g.profile for g in self.grids if g.profile)

    def row_spec(self, row: str) -> dict[str, Any]:
        """A row's spec from the grids' plans (``{"kind": ..., "label": ...}``; {} if none)."""
        for g in self.grids:
            for plan in (g, *g.parts):
                spec = plan.methods.get(row)
                if isinstance(spec, dict):
                    return spec
        return {}

    def label(self, row: str) -> str:
        """A row's display name: the grid row's ``label``, else the row name.

        Raises:
            TableError: a ``label`` that is not a non-empty string (names the grid.json).
        """
        for g in self.grids:
            for plan in (g, *g.parts):
                spec = plan.methods.get(row)
                if not isinstance(spec, dict) or spec.get("label") is None:
                    continue
                label = spec["label"]
                if not isinstance(label, str) or not label.strip():
                    raise TableError(
                        f"{plan.path}: methods.{row}.label must be a non-empty string, "
                        f"got {label!r}"
                    )
                return label
        return row

    def kind(self, row: str) -> str | None:
        """A row's method kind (``raeg``, ``classwise_noise``, ...; None when nothing says)."""
        kind = self.row_spec(row).get("kind")
        if kind is None:
            kind = self.methods.get(row, {}).get("kind")
        return None if kind is None else str(kind)

    def reversible(self, row: str) -> bool | None:
        """Whether a method restores its images (None when nothing says)."""
        rev = self.methods.get(row, {}).get("reversible")
        if rev is not None:
            return rev
        if any(k[0] == row and k[1] == "recovered" for k in self.pirates):
            return True
        return None


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
    sources: dict[str, list[Path]] = {}
    per_dir_runs: list[list[PirateRun]] = []
    per_dir_methods: list[list[str]] = []
    for d in dirs:
        if not d.is_dir():
            raise TableError(f"run directory not found: {d}")
        grid_file = d / PLAN_FILE
        method_files = sorted((d / "methods").glob("*/results.json"))
        pirate_files = sorted((d / "pirates").rglob(RESULTS_FILE))
        if not grid_file.is_file() and not method_files and not pirate_files:
            raise TableError(
                f"{d}: no grid.json and no results (expected methods/<row>/results.json or "
                "pirates/<row>/<arch>/<defense>/seed<k>/results.json); is this a grid run "
                "directory?"
            )
        plan = load_grid(grid_file) if grid_file.is_file() else GridPlan(path=d)
        grids.append(plan)
        known = unique(x for g in grids for x in g.defenses)
        rows_here: list[str] = []
        for f in method_files:
            m = load_method(f)
            rows_here.append(m["row"])
            if m["row"] in methods:
                duplicates.append(f)
                continue
            methods[m["row"]] = m
            if m["commit"]:
                commits[m["commit"]] = commits.get(m["commit"], 0) + 1
            sources.setdefault(m["commit"] or UNKNOWN_COMMIT, []).append(f)
        runs_here: list[PirateRun] = []
        for f in pirate_files:
            run = load_pirate(f, d / "pirates", known)
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
            sources.setdefault(run.commit or UNKNOWN_COMMIT, []).append(f)
        per_dir_runs.append(runs_here)
        per_dir_methods.append(rows_here)

    all_runs = [r for runs in per_dir_runs for r in runs]
    rows = unique(
        [
            *(r for g in grids for r in g.rows),
            *(r for rows_here in per_dir_methods for r in rows_here),
            *(r.row for r in all_runs),
        ]
    )
    if CLEAN in rows:
        rows = [CLEAN, *(r for r in rows if r != CLEAN)]
    archs = unique([*(a for g in grids for a in g.archs), *(r.arch for r in all_runs)])
    defenses = unique([*(x for g in grids for x in g.defenses), *(r.defense for r in all_runs)])
    eval_defenses = unique(
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
    heldout = unique(
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
        sources=sources,
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
    rows = plan.rows or unique([*method_rows, *(r.row for r in runs)])
    archs = plan.archs or unique(r.arch for r in runs)
    defenses = plan.defenses or unique(r.defense for r in runs)
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
                want((row, source_of(row), arch, d))
        if row != CLEAN and res.reversible(row):
            for arch in auth_archs:
                want((row, "recovered", arch, NO_DEFENSE))
