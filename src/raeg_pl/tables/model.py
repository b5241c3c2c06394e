"""The table model: cells (mean +- std over seeds, single values, not applicable, missing),
columns, rows and tables, independent of the output format."""

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
