"""Where a pipeline run's recovery error sits, and what it costs the authorised user.

Reads a finished ``raeg pipeline`` run: the exported clean and recovered training images
(``<run>/export/{clean,recovered}``, the stored 8-bit PNG files) and ``results.json``, and
prints recovered PSNR, the mean absolute recovery error in 8-bit levels on the originals'
saturated pixels (0 or 255) against the others, the same in the 4x4 corners against the
central 8x8 block, and the authorised gap. Several runs side by side:

    .venv/bin/python benchmarks/saturated_recovery.py runs/RUN_A runs/RUN_B [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from raeg_pl.io.protected import load_export
from raeg_pl.metrics.saturation import saturation_error
from raeg_pl.stages.report import authorized_gap


def corner_centre(clean: torch.Tensor, recovered: torch.Tensor) -> tuple[float, float]:
    """Mean absolute error (levels) in the four 4x4 corners and in the central 8x8 block."""
    err = (recovered.float() - clean.float()).abs()
    h, w = err.shape[-2:]
    corners = torch.cat(
        [
            err[..., :4, :4].flatten(1),
            err[..., :4, w - 4 :].flatten(1),
            err[..., h - 4 :, :4].flatten(1),
            err[..., h - 4 :, w - 4 :].flatten(1),
        ],
        dim=1,
    )
    centre = err[..., h // 2 - 4 : h // 2 + 4, w // 2 - 4 : w // 2 + 4]
    return float(corners.mean()), float(centre.mean())


def measure(run: Path) -> dict:
    """The figures of one run directory."""
    clean, labels, _, rels, _ = load_export(run / "export" / "clean")
    recovered, labels_r, _, rels_r, _ = load_export(run / "export" / "recovered")
    if rels != rels_r or not torch.equal(labels, labels_r):
        raise ValueError(f"{run}: clean and recovered exports hold different files")
    out = saturation_error(clean, recovered)
    out["mae_corners"], out["mae_centre"] = corner_centre(clean, recovered)
    results = run / "results.json"
    if results.is_file():
        res = json.loads(results.read_text())
        out.update(
            psnr_protected=res.get("psnr_protected"),
            clean_acc=res.get("clean_acc"),
            pirate_acc=res.get("pirate_acc"),
            authorized_acc=res.get("authorized_acc"),
            authorized_gap=authorized_gap(res),
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    table = {str(r): measure(r) for r in args.runs}
    keys = list(next(iter(table.values())))
    print("| figure | " + " | ".join(Path(r).name for r in table) + " |")
    print("|---|" + "---|" * len(table))
    for k in keys:
        cells = []
        for v in table.values():
            x = v.get(k)
            cells.append("-" if x is None else f"{x:.4g}")
        print(f"| {k} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
