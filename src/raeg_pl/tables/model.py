"""The table model: cells (mean +- std over seeds, worst cases, single values, not
applicable, missing), columns, rows and tables, independent of the output format; and the
comparison of two cells over seeds (:func:`verdict`)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

MISSING_TEXT = "—"
NA_TEXT = "n/a"


@dataclass(frozen=True)
class Stat:
    """A cell aggregated over seeds; accuracies as fractions.

    Attributes:
        mean: mean final accuracy.
        std: sample standard deviation (ddof=1); None with one seed.
        n: number of seeds found.
        n_planned: number of seeds the grids plan for the cell.
        peak: mean peak accuracy over the seeds that record one (None if none do).
        lo: lowest final accuracy over the seeds (None: not recorded).
        hi: highest final accuracy over the seeds (None: not recorded).
        commits: the provenance (git commit, ``+dirty`` suffix, or ``unknown``) of its runs.
    """

    mean: float
    std: float | None
    n: int
    n_planned: int
    peak: float | None = None
    lo: float | None = None
    hi: float | None = None
    commits: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Value:
    """A single-number cell: its display text, the raw value written to CSV, and the
    provenance of the result it comes from (see :attr:`Stat.commits`)."""

    text: str
    raw: float | str
    commits: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Worst:
    """A row's worst case for the protection: the highest mean pirate accuracy over its
    pirate defences, and the defence that reaches it.

    Attributes:
        stat: the cell of that defence.
        defense: the defence's short name (``jpeg q10``).
        lower_bound: some of the row's cells are still missing, so the true worst case may
            be higher.
        commits: the provenance of every cell of the row it was taken over.
    """

    stat: Stat
    defense: str
    lower_bound: bool
    commits: frozenset[str] = frozenset()


class _NotApplicable:
    """A cell no grid plans and no result fills (an irreversible method's recovery, ...)."""

    def __repr__(self) -> str:
        return "NA"


NA = _NotApplicable()
Cell = Stat | Worst | Value | _NotApplicable | None  # None: planned but missing
LOWER_BOUND = "≥ "


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; None for a single value) of ``values``."""
    if not values:
        raise ValueError("mean_std of no values")
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) >= 2 else None)


def pct(v: float) -> str:
    """A fraction as a percentage with one decimal (``0.4137`` -> ``41.4``)."""
    return f"{100 * v:.1f}"


WIN, LOSS, TIE, UNDECIDED = "win", "loss", "tie", "undecided (1 seed)"


def verdict(method: Stat, reference: Stat) -> str:
    """Whether ``method`` beats ``reference`` beyond the spread over seeds.

    Lower pirate accuracy is better for a protection. A difference counts only when the
    two cells' seed ranges (lowest to highest final accuracy) do not overlap: ``win`` when
    every seed of ``method`` lies below every seed of ``reference``, ``loss`` the other way
    round, else ``tie``; with a single seed in either cell there is no spread to compare
    against, so the verdict is ``undecided (1 seed)``.
    """
    if method.n < 2 or reference.n < 2:
        return UNDECIDED
    m_lo, m_hi = _range(method)
    r_lo, r_hi = _range(reference)
    if m_hi < r_lo:
        return WIN
    if m_lo > r_hi:
        return LOSS
    return TIE


def _range(s: Stat) -> tuple[float, float]:
    if s.lo is None or s.hi is None:
        raise ValueError(f"a cell of {s.n} seeds without its seed range: {s}")
    return s.lo, s.hi


@dataclass
class Column:
    """A table column.

    Attributes:
        key: the CSV field stem, unique in the table (``none/resnet``).
        label: the header text.
        group: a header spanning adjacent columns with the same group (None: no group).
        kind: ``stat`` (mean +- std), ``stat_peak`` (plus peak mean), ``worst`` (a
            :class:`Worst`) or ``value``.
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
        if self.kind == "worst":
            stems = ["mean", "std", "n_seeds", "defence", "lower_bound"]
            return [f"{self.key} {s}" for s in stems]
        stems = ["mean", "std", "n_seeds"] + (["peak_mean"] if self.kind == "stat_peak" else [])
        return [f"{self.key} {s}" for s in stems]


@dataclass
class Row:
    """A table row: label cells, data cells, and whether a rule separates it from the last.

    ``shown_labels`` replaces ``labels`` in markdown and LaTeX (a group's label written
    once); CSV always repeats the full labels. ``key`` is the grid row it shows (labels may
    be display names) and ``source`` the training data of its pirates, for comparisons.
    """

    labels: list[str]
    cells: list[Cell]
    rule_before: bool = False
    shown_labels: list[str] | None = None
    key: str | None = None
    source: str | None = None


@dataclass
class Table:
    """A rendered-format-independent table: headers, rows, notes and missing-cell counts.

    Attributes:
        marks: provenance -> marker appended to the cells whose runs come from it (set
            when results of several commits or of a dirty tree are allowed).
        comparisons: tables comparing this one's rows (rendered after it).
        counts_missing: whether the footnotes count missing cells (not for comparisons).
    """

    name: str
    title: str
    label_headers: list[str]
    columns: list[Column]
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    marks: dict[str, str] = field(default_factory=dict)
    comparisons: list[Table] = field(default_factory=list)
    counts_missing: bool = True

    @property
    def n_cells(self) -> int:
        """Cells that some grid plans (or that hold a result); derived worst cases aside."""
        return sum(c is not NA for c in self._own_cells())

    @property
    def n_missing(self) -> int:
        """Planned cells with no result."""
        return sum(c is None for c in self._own_cells())

    @property
    def n_short(self) -> int:
        """Cells with fewer seeds than planned."""
        return sum(isinstance(c, Stat) and c.n < c.n_planned for c in self._own_cells())

    def _own_cells(self) -> list[Cell]:
        """The cells read from results, without the columns derived from them."""
        return [
            c
            for r in self.rows
            for c, col in zip(r.cells, self.columns, strict=True)
            if col.kind != "worst"
        ]

    def footnotes(self) -> list[str]:
        """The footnote lines: missing-cell count first, then the table's own notes."""
        lines = []
        if self.counts_missing:
            lines.append(f"{self.n_missing} of {self.n_cells} cells missing ({MISSING_TEXT}).")
        if any(isinstance(c, Worst) and c.lower_bound for r in self.rows for c in r.cells):
            lines.append(
                f"{LOWER_BOUND.strip()}: a lower bound, some of the row's cells are missing."
            )
        if any(c is NA for r in self.rows for c in r.cells):
            lines.append(f"{NA_TEXT}: not applicable, or not part of any grid.")
        if self.n_short:
            lines.append(f"{self.n_short} cells have fewer seeds than planned (marked).")
        return lines + self.notes


def cell_commits(cell: Cell) -> frozenset[str]:
    """The provenance of the results a cell is made of (empty for missing cells)."""
    return getattr(cell, "commits", frozenset())


def format_cell(cell: Cell, column: Column, marks: dict[str, str] | None = None) -> str:
    """A cell's display text (plain Unicode; LaTeX escaping happens when rendering),
    followed by the ``marks`` of the provenances its results come from."""
    text = _cell_text(cell, column)
    shown = cell_marks(cell, marks or {})
    return f"{text} [{shown}]" if shown else text


def cell_marks(cell: Cell, marks: dict[str, str]) -> str:
    """The markers of the provenances a cell's results come from (``c1,c2``; "" if none)."""
    return ",".join(sorted({marks[c] for c in cell_commits(cell) if c in marks}))


def _cell_text(cell: Cell, column: Column) -> str:
    if cell is None:
        return MISSING_TEXT
    if cell is NA:
        return NA_TEXT
    if isinstance(cell, Value):
        return cell.text
    if isinstance(cell, Worst):
        bound = LOWER_BOUND if cell.lower_bound else ""
        return f"{bound}{_cell_text(cell.stat, Column(column.key, column.label))} ({cell.defense})"
    assert isinstance(cell, Stat)
    text = pct(cell.mean) if cell.std is None else f"{pct(cell.mean)} ± {pct(cell.std)}"
    if column.kind == "stat_peak" and cell.peak is not None:
        text += f" ({pct(cell.peak)})"
    if cell.n == 1:
        text += " (1 seed)"
    elif cell.n < cell.n_planned:
        text += f" ({cell.n} of {cell.n_planned} seeds)"
    return text
