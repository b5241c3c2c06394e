"""The paper tables built from merged results: main, fidelity, robustness and inference."""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable

from raeg_pl.tables.model import NA, Cell, Column, Row, Stat, Table, Value, mean_std, pct
from raeg_pl.tables.records import NO_DEFENSE, defense_key, source_of
from raeg_pl.tables.results import Results


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
    return defense_key(d) in ("gray", "grey", "grayscale", "greyscale")


def _is_jpeg10(d: str) -> bool:
    return re.fullmatch(r"jpeg(q|quality)?10", defense_key(d)) is not None


def defense_label(d: str) -> str:
    """A defence's column and axis label (``none`` reads as "no defence")."""
    return "no defence" if d == NO_DEFENSE else d


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
            [row],
            [pirate_stat(res, row, source_of(row), a, d) for d in groups for a in res.archs],
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
        Column("craft_seconds_per_1000", "crafting (s / 1k img.)"),
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
            # Runs made before the cost was recorded: n/a (see the note), not a missing run.
            NA
            if m.get("craft_seconds_per_1000") is None
            else _fmt(m["craft_seconds_per_1000"], ".1f"),
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
            "Crafting: seconds of fitting and protecting the training split per 1,000"
            " images, on the machine that ran the method's stage (n/a: not recorded by"
            " the run).",
        ],
    )


def build_robustness(res: Results, arch: str) -> Table:
    """Pirate final accuracy per pirate defence for one architecture."""
    columns = [Column(d, defense_label(d), None, "stat") for d in res.defenses]
    rows = [
        Row([row], [pirate_stat(res, row, source_of(row), arch, d) for d in res.defenses])
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
