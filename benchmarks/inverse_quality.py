"""How close the pirate's learned inverse comes to the originals, for finished grid pirates.

Grid pirates trained with ``inverse:k=K`` keep this in their ``results.json``
(``defense_stats``) since the inverse's quality was recorded; for pirates trained before,
this rebuilds each one's data module from its recorded data section and fits the same
inverse again (same seed, same pairs: the figures are those the pirate trained on), then
prints per row: the inverse's PSNR against the originals before and after, on the leaked
pairs and on the pirate's other training images, beside the pirate's clean-test accuracy.

Run from the folder the grid ran in (its data paths are relative to it):

    .venv/bin/python benchmarks/inverse_quality.py --runs runs/tables/quick_ablation \
        [--rows full volume] [--arch resnet] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from raeg_pl.data.datamodule import ImageClassificationDataModule


def inverse_stats(results: dict) -> dict:
    """``defense_stats`` of a learned-inverse pirate's results, recomputed if absent."""
    if results.get("defense_stats"):
        return results["defense_stats"]
    dm = ImageClassificationDataModule(**{**results["data"], "val_on_test": True})
    dm.setup()
    return dm.train_defense_stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", required=True, help="grid run folder (holds pirates/)")
    ap.add_argument("--rows", nargs="*", help="rows (default: every row with such a pirate)")
    ap.add_argument("--arch", default="resnet")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    found = sorted(Path(args.runs).glob(f"pirates/*/{args.arch}/inverse_*/seed*/results.json"))
    figures = {}
    for path in found:
        row, leaf, seed = path.parts[-5], path.parts[-3], path.parts[-2]
        if args.rows and row not in args.rows:
            continue
        results = json.loads(path.read_text())
        stats = inverse_stats(results)
        figures[f"{row}/{leaf}/{seed}"] = {**stats, "pirate_acc": results["test_acc"]}
        print(
            f"{row:22s} {leaf:16s} {seed:6s} pairs {stats['pair_psnr_before']:6.2f} -> "
            f"{stats['pair_psnr_after']:6.2f} dB   other training images "
            f"{stats['heldout_psnr_before']:6.2f} -> {stats['heldout_psnr_after']:6.2f} dB   "
            f"pirate {100 * results['test_acc']:5.1f}%",
            flush=True,
        )
    if not figures:
        raise SystemExit(f"{args.runs}: no finished {args.arch} learned-inverse pirates")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
