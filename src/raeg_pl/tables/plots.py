"""The summary plots: protected-image PSNR against pirate accuracy, and pirate defences."""

from __future__ import annotations

import io
from pathlib import Path

from raeg_pl.tables.builders import defense_label, pirate_stat
from raeg_pl.tables.model import Stat
from raeg_pl.tables.records import CLEAN, NO_DEFENSE, source_of
from raeg_pl.tables.results import Results
from raeg_pl.utils.files import write_atomic


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
        ax.annotate(
            res.label(row), (psnr, 100 * stat.mean), textcoords="offset points", xytext=(5, 4)
        )
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
            stat = pirate_stat(res, row, source_of(row), arch, d)
            if isinstance(stat, Stat):
                xs.append(j - 0.4 + (i + 0.5) * width)
                ys.append(100 * stat.mean)
                errs.append(100 * (stat.std or 0.0))
        if xs:
            ax.bar(xs, ys, width, yerr=errs, capsize=2, label=res.label(row))
            n += len(xs)
    ax.set_xticks(range(len(defs)), [defense_label(d) for d in defs], rotation=30, ha="right")
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
