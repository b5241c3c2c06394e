"""The paper tables built from merged results: main, fidelity, robustness and inference,
with the robustness table's worst case per row and, for the main and robustness tables,
each method compared with the class-wise control (:data:`CONTROL_KIND`)."""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable

from raeg_pl.tables.model import (
    MISSING_TEXT,
    NA,
    UNDECIDED,
    Cell,
    Column,
    Row,
    Stat,
    Table,
    Value,
    Worst,
    cell_commits,
    mean_std,
    pct,
    verdict,
)
from raeg_pl.tables.records import CLEAN, NO_DEFENSE, UNKNOWN_COMMIT, defense_key, source_of
from raeg_pl.tables.results import Results

#: The method kind of the control rows every method is compared with: random class-wise
#: noise at the method's distortion, which a model learns as a shortcut as well.
CONTROL_KIND = "classwise_noise"
#: The verdict on a worst case that is only a lower bound.
PARTIAL = "undecided (cells missing)"


def pirate_stat(res: Results, row: str, source: str, arch: str, defense: str) -> Cell:
    """The seed-aggregated cell of pirate runs (None: planned but no run; NA: not planned)."""
    key = (row, source, arch, defense)
    runs = res.pirates.get(key)
    if not runs:
        return None if key in res.planned else NA
    ordered = [runs[s] for s in sorted(runs)]
    accs = [r.test_acc for r in ordered]
    mean, std = mean_std(accs)
    peaks = [r.test_acc_peak for r in ordered if r.test_acc_peak is not None]
    return Stat(
        mean=mean,
        std=std,
        n=len(ordered),
        n_planned=max(len(res.planned.get(key, ())), len(ordered)),
        peak=statistics.fmean(peaks) if peaks else None,
        lo=min(accs),
        hi=max(accs),
        commits=frozenset(r.commit or UNKNOWN_COMMIT for r in ordered),
    )


def method_commits(res: Results, row: str) -> frozenset[str]:
    """The provenance of a method row's ``results.json`` (empty when it has none)."""
    m = res.methods.get(row)
    return frozenset() if m is None else frozenset([m["commit"] or UNKNOWN_COMMIT])


def stamped(cells: list[Cell], commits: frozenset[str]) -> list[Cell]:
    """``cells`` with the provenance of the result file they were read from."""
    return [
        Value(c.text, c.raw, commits) if isinstance(c, Value) and not c.commits else c
        for c in cells
    ]


def _is_gray(d: str) -> bool:
    return defense_key(d) in ("gray", "grey", "grayscale", "greyscale")


def _is_jpeg10(d: str) -> bool:
    return re.fullmatch(r"jpeg(q|quality)?10", defense_key(d)) is not None


def defense_label(d: str) -> str:
    """A defence's column and axis label (``none`` reads as "no defence")."""
    return "no defence" if d == NO_DEFENSE else d


def defense_short(d: str) -> str:
    """A defence spec as a few words (``jpeg:q=10`` -> ``jpeg q10``; ``none`` -> ``none``)."""
    name, _, params = d.partition(":")
    return " ".join([name, *(p.replace("=", "") for p in params.split(",") if p)])


def worst_case(res: Results, row: str, source: str, arch: str) -> Cell:
    """The row's highest mean pirate accuracy over every pirate defence (its worst case).

    A lower bound when some planned cell of the row is still missing; None when none has
    a result; NA when the row plans no such cell.
    """
    cells = {d: pirate_stat(res, row, source, arch, d) for d in res.defenses}
    stats = {d: c for d, c in cells.items() if isinstance(c, Stat)}
    if not stats:
        return None if any(c is None for c in cells.values()) else NA
    d = max(stats, key=lambda k: stats[k].mean)
    return Worst(
        stat=stats[d],
        defense=defense_short(d),
        lower_bound=any(c is None for c in cells.values()),
        commits=frozenset().union(*(s.commits for s in stats.values())),
    )


def _compared(cell: Cell) -> Stat | None:
    return cell.stat if isinstance(cell, Worst) else cell if isinstance(cell, Stat) else None


def control_comparisons(res: Results, table: Table) -> list[Table]:
    """One table per class-wise control row of ``table``: every other method row's cells
    against the control's in the same column (win, loss, tie or undecided; see
    :func:`~raeg_pl.tables.model.verdict`).

    Rows are found by their method kind, never by name: the controls are the rows of kind
    :data:`CONTROL_KIND`, the methods every other row on protected data. A table without a
    control row gets a single-line note instead.
    """
    protected = [r for r in table.rows if r.source == "protected" and r.key not in (None, CLEAN)]
    controls = [r for r in protected if res.kind(r.key) == CONTROL_KIND]
    if not controls:
        table.notes.append(
            f"No class-wise control row (a row of kind {CONTROL_KIND}) in these runs: the"
            " methods are not compared with one."
        )
        return []
    out = []
    for control in controls:
        rows = []
        for r in protected:
            if r is control:
                continue
            cells: list[Cell] = []
            for mine, ref in zip(r.cells, control.cells, strict=True):
                a, b = _compared(mine), _compared(ref)
                if a is None or b is None:
                    cells.append(NA if mine is NA or ref is NA else None)
                    continue
                # A worst case over missing cells may still rise: no verdict on it yet.
                bound = any(isinstance(c, Worst) and c.lower_bound for c in (mine, ref))
                text = f"{PARTIAL if bound else verdict(a, b)}, {100 * (a.mean - b.mean):+.1f}"
                cells.append(Value(text, text, cell_commits(mine) | cell_commits(ref)))
            rows.append(Row(list(r.labels), cells, key=r.key, source=r.source))
        name = f"{table.name}_vs_{control.key}"
        out.append(
            Table(
                name=name,
                title=f"{table.title}: each method against the class-wise control"
                f" {control.labels[0]}",
                label_headers=list(table.label_headers),
                columns=[Column(c.key, c.label, c.group) for c in table.columns],
                rows=rows,
                notes=[
                    "Cells: verdict, then the method's mean minus the control's in points"
                    " (pirate accuracy; lower is better protection). A win or a loss only when"
                    " the two cells' ranges over seeds do not overlap, else a tie;"
                    f" {UNDECIDED} when either cell has a single seed; {PARTIAL} when either"
                    f" is a worst case with cells missing; {MISSING_TEXT}: a cell is missing.",
                ],
                counts_missing=False,
            )
        )
    return out


def build_main(res: Results) -> Table:
    """Pirate clean-test accuracy per row and architecture; no defence, grayscale, JPEG-10."""
    present = {k[3] for k in res.pirates}
    groups = [NO_DEFENSE]
    groups += [d for d in res.defenses if d in present and _is_gray(d)][:1]
    groups += [d for d in res.defenses if d in present and _is_jpeg10(d)][:1]
    grouped = len(groups) > 1
    columns = [
        Column(f"{d}/{a}", a, defense_label(d) if grouped else None, "stat_peak")
        for d in groups
        for a in res.archs
    ]
    rows = [
        Row(
            [res.label(row)],
            [pirate_stat(res, row, source_of(row), a, d) for d in groups for a in res.archs],
            key=row,
            source=source_of(row),
        )
        for row in res.rows
    ]
    first = True
    for row in res.method_rows:
        if res.reversible(row):
            cells = [pirate_stat(res, row, "recovered", a, d) for d in groups for a in res.archs]
            label = f"{res.label(row)} (authorised)"
            rows.append(Row([label], cells, rule_before=first, key=row, source="recovered"))
            first = False
    table = Table(
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
    table.comparisons = control_comparisons(res, table)
    return table


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
        Column("craft_seconds_per_1000", "crafting (s / 1k img.)"),
        Column("protector_fit_seconds", "protector fit (s)"),
        Column("perturbation_classmean_share", "class-mean share (%)"),
        Column("perturbation_cos_same_class", "cos same class"),
        Column("perturbation_cos_diff_class", "cos diff. class"),
    ]
    rows = []
    for row in res.method_rows:
        m = res.methods.get(row)
        if m is None:
            rows.append(Row([res.label(row)], [None] * len(columns), key=row))
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
            # Runs made before a figure was recorded: n/a (see the notes), not a missing run.
            *(
                NA if m.get(key) is None else _fmt(m[key], spec, scale)
                for key, spec, scale in (
                    ("craft_seconds_per_1000", ".1f", 1.0),
                    ("protector_fit_seconds", ".0f", 1.0),
                    ("perturbation_classmean_share", ".1f", 100.0),
                    ("perturbation_cos_same_class", ".3f", 1.0),
                    ("perturbation_cos_diff_class", ".3f", 1.0),
                )
            ),
        ]
        rows.append(Row([res.label(row)], stamped(cells, method_commits(res, row)), key=row))
    return Table(
        name="fidelity",
        title="Fidelity of the protected images and their recovery",
        label_headers=["method"],
        columns=columns,
        rows=rows,
        notes=[
            "Measured from the stored 8-bit files; L-inf and L2: per-image norms of the"
            " protected-minus-original difference in 8-bit levels, averaged over images.",
            "Crafting: seconds of protecting the training split per 1,000 images, with the"
            " fitting of the models a method trains for it (error-minimising noise's source"
            " model), on the machine that ran the method's stage; the surrogates every"
            " method attacks are not counted. RAEG's protector is fitted once, before (protector"
            " fit: seconds of the whole fit, on the same machine), then protects any image at"
            " its crafting cost (n/a: not recorded by the run, or no protector).",
            "Class structure of the stored perturbation (protected minus original): the share"
            " of its energy that the class means explain, and the mean cosine between two"
            " images' perturbations of the same and of different classes (a random class-wise"
            " pattern: 100% and 1; independent noise: about 1 / images per class and 0; n/a:"
            " not recorded by the run).",
        ],
    )


def build_robustness(res: Results, arch: str) -> Table:
    """Pirate final accuracy per pirate defence for one architecture, and each row's worst
    case: the highest mean accuracy over its defences, with the defence that reaches it."""
    columns = [Column(d, defense_label(d), None, "stat") for d in res.defenses]
    columns.append(Column("worst case", "worst case", None, "worst"))
    rows = [
        Row(
            [res.label(row)],
            [
                *(pirate_stat(res, row, source_of(row), arch, d) for d in res.defenses),
                worst_case(res, row, source_of(row), arch),
            ],
            key=row,
            source=source_of(row),
        )
        for row in res.rows
    ]
    table = Table(
        name="robustness",
        title=f"Pirate accuracy on the clean test set after each pirate defence, {arch} (%)",
        label_headers=["training data"],
        columns=columns,
        rows=rows,
        notes=[
            "Cells: final accuracy mean ± std over seeds; the pirate applies the column's"
            " defence to every training image before training.",
            "Worst case: the highest mean accuracy over the row's pirate defences (no defence"
            " included), with the defence that reaches it: what the best of these pirates"
            " achieves.",
        ],
    )
    table.comparisons = control_comparisons(res, table)
    return table


def build_inference(res: Results) -> Table:
    """Surrogate and held-out classifiers' accuracy on protected test images per defence."""
    heldout = res.heldout
    columns = [Column("clean", "clean images")] + [
        Column(d, defense_label(d), "protected images", "value") for d in res.eval_defenses
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
        label = res.label(row)
        for j, (who, cells) in enumerate(lines):
            rows.append(
                Row(
                    [label, who],
                    stamped(cells, method_commits(res, row)),
                    rule_before=(i > 0 and j == 0),
                    shown_labels=[label if j == 0 else "", who],
                    key=row,
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
