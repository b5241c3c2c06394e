"""The experiment's summary (the run's ``results.json``) and ``report.md``."""

from __future__ import annotations

from pathlib import Path

from raeg_pl.stages.common import read_stage, slug
from raeg_pl.utils.files import write_atomic_text


def authorized_gap(results: dict) -> float | None:
    """The authorised gap: authorised accuracy minus the clean-trained accuracy, as a fraction.

    The authorised model is trained on the images an authorised user recovers from the
    protected files, the clean one on the original images, with the same recipe and no pirate
    defence; a reversible protector should leave the gap at 0. None when either is missing.
    """
    a, c = results.get("authorized_acc"), results.get("clean_acc")
    if a is None or c is None:
        return None
    return float(a) - float(c)


def summarise(cfg: dict, run_dir: Path, exp: dict, clfs: dict[str, dict]) -> dict:
    """The experiment's headline figures, from the stage results."""
    defenses = list(cfg.get("pirate_defenses") or ["none"])
    by_def = {d: clfs[f"pirate_{slug(d)}"] for d in defenses}
    clean_by_def = {d: clfs[f"clean_{slug(d)}"] for d in defenses}
    prot = read_stage(run_dir / "protector")
    sur = [read_stage(run_dir / f"surrogate_{i}") for i in range(len(cfg["surrogates"]))]
    base = clean_by_def.get("none") or next(iter(clean_by_def.values()))
    pirate = by_def.get("none") or next(iter(by_def.values()))
    summary = {
        "profile": cfg.get("profile"),
        **{
            k: exp[k]
            for k in (
                "psnr_protected",
                "ssim_protected",
                "linf_protected",
                "psnr_recovered",
                "ssim_recovered",
                "exact_pixel_rate_recovered",
                "surrogate_acc_clean",
                "surrogate_acc_protected",
                "surrogate_acc_protected_by_defense",
                "surrogate_acc_protected_train",
                "surrogate_acc_clean_train",
            )
        },
        "clean_acc": base["test_acc"],
        "clean_acc_peak": base["test_acc_peak"],
        "clean_acc_by_defense": {d: r["test_acc"] for d, r in clean_by_def.items()},
        "pirate_acc": pirate["test_acc"],
        "pirate_acc_peak": pirate["test_acc_peak"],
        "pirate_acc_by_defense": {d: r["test_acc"] for d, r in by_def.items()},
        "pirate_acc_peak_by_defense": {d: r["test_acc_peak"] for d, r in by_def.items()},
        "authorized_acc": clfs["authorized"]["test_acc"],
        "authorized_acc_peak": clfs["authorized"]["test_acc_peak"],
        "surrogate_test_acc": [s["test_acc"] for s in sur],
        "protector_val": {k: v for k, v in prot["metrics"].items() if k.startswith("val/")},
        "splits": {
            "protected_train": exp["exported_images"],
            "protector": prot["splits"],
            "surrogates": [s["splits"] for s in sur],
            "pirate": pirate["splits"],
            "test": exp["test_images"],
        },
        "curves": {name: r["test_acc_curve"] for name, r in clfs.items()},
        "adv_mode": cfg["protector"]["model"].get("adv_mode", "targeted"),
    }
    summary["authorized_gap"] = authorized_gap(summary)
    return summary


def write_report(run_dir: Path, results: dict) -> Path:
    """``report.md`` with the table, the protector's image grid, and accuracy / PSNR plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in results["curves"].items():
        ax[0].plot(
            range(1, len(curve) + 1),
            [100 * c for c in curve],
            label=name,
            linestyle="--" if name.startswith("clean") else "-",
        )
    ax[0].set(xlabel="epoch", ylabel="clean-test accuracy (%)", title="classifiers")
    ax[0].legend(fontsize=7)
    hist = read_stage(run_dir / "protector")["history"]
    ax[1].plot(
        [h["epoch"] + 1 for h in hist],
        [h.get("val/psnr_protected") for h in hist],
        "o-",
        label="protected",
    )
    ax[1].plot(
        [h["epoch"] + 1 for h in hist],
        [h.get("val/psnr_recovered") for h in hist],
        "s-",
        label="recovered",
    )
    ax[1].set(xlabel="protector epoch", ylabel="PSNR (dB, held-out, 8-bit)", title="protector")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=110)
    plt.close(fig)
    grids = sorted((run_dir / "protector" / "grids").glob("*.png"))
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    gap = authorized_gap(results)
    rows = [
        ("PSNR protected (dB)", f"{results['psnr_protected']:.2f}"),
        ("SSIM protected", f"{results['ssim_protected']:.4f}"),
        ("L-inf protected (8-bit levels, mean)", f"{results['linf_protected']:.1f}"),
        ("PSNR recovered from PNG (dB)", f"{results['psnr_recovered']:.2f}"),
        ("exact pixel rate recovered", f"{results['exact_pixel_rate_recovered']:.4f}"),
        ("surrogate acc clean test (%)", pct(results["surrogate_acc_clean"])),
        (
            "surrogate acc on the training images, clean / protected (%)",
            f"{pct(results['surrogate_acc_clean_train'])} / "
            f"{pct(results['surrogate_acc_protected_train'])}",
        ),
        *[
            (f"surrogate acc protected test, {d} (%)", pct(v))
            for d, v in results["surrogate_acc_protected_by_defense"].items()
        ],
        *[
            (f"clean-trained acc, pirate defence {d} (%)", pct(v))
            for d, v in results["clean_acc_by_defense"].items()
        ],
        *[
            (
                f"pirate acc final / peak, defence {d} (%)",
                f"{pct(v)} / {pct(results['pirate_acc_peak_by_defense'][d])}",
            )
            for d, v in results["pirate_acc_by_defense"].items()
        ],
        ("authorised acc (recovered data) (%)", pct(results["authorized_acc"])),
        *(
            [("authorised gap: authorised minus clean-trained (points)", f"{100 * gap:+.1f}")]
            if gap is not None
            else []
        ),
    ]
    headline = []
    if gap is not None:
        headline = [
            f"**Authorised gap: {100 * gap:+.1f} points** (authorised model on the recovered"
            f" images {pct(results['authorized_acc'])}% against the clean-trained"
            f" {pct(results['clean_acc'])}%; 0 when the recovery loses nothing the classifier"
            f" uses); recovered PSNR {results['psnr_recovered']:.2f} dB from the stored files.",
            "",
        ]
    lines = [
        f"# Protection experiment: {run_dir.name}",
        "",
        *headline,
        f"Profile: {results.get('profile') or 'custom'}; adversarial mode: {results['adv_mode']}."
        " All figures after 8-bit PNG storage; classifier accuracies on the clean test split"
        f" ({results['splits']['test']} images); protected training set:"
        f" {results['splits']['protected_train']} images.",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "![curves](curves.png)",
    ]
    if grids:
        rel = grids[-1].relative_to(run_dir)
        lines += [
            "",
            "Rows: original, protected, difference x10, recovered.",
            "",
            f"![grid]({rel.as_posix()})",
        ]
    path = run_dir / "report.md"
    write_atomic_text(path, "\n".join(lines) + "\n")
    return path


__all__ = ["authorized_gap", "summarise", "write_report"]
