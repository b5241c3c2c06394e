"""Does what restore leaves behind carry the label? A probe on the restore residual alone.

For an export's clean and recovered training folders (``<method>/clean/train`` and
``<method>/recovered/train`` of a grid or pipeline run), takes each image's restore residual
``recovered - clean`` (8-bit levels), trains a small CNN to predict the image's class from
the residual alone on 80% of the images and reports its accuracy on the other 20% (chance:
one over the classes). A residual that predicts the label is a shortcut an authorised model
trained on the recovered images can learn instead of the images' content. Also printed: the
residual's RMSE and the share of its energy in the class means (a fixed per-class pattern
would put it there; a class-dependent but image-specific residual does not).

    .venv/bin/python benchmarks/restore_residual_probe.py --export runs/tables/quick_ablation/methods/full \
        [--epochs 6] [--cache /tmp/probe_cache]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from raeg_pl.data.cache import load_split_cached
from raeg_pl.metrics.perturbation import class_structure


def probe_accuracy(residual: torch.Tensor, labels: torch.Tensor, epochs: int, seed: int) -> float:
    """Held-out accuracy of a small CNN trained on (N, C, H, W) float residuals (80 / 20)."""
    torch.manual_seed(seed)
    k = int(labels.max()) + 1
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n = int(0.8 * len(labels))
    train, test = order[:n], order[n:]
    net = nn.Sequential(
        nn.Conv2d(residual.shape[1], 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, k),
    )
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    for _ in range(epochs):
        for i in range(0, n, 128):
            idx = train[i : i + 128]
            loss = F.cross_entropy(net(residual[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((net(residual[test]).argmax(1) == labels[test]).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--export", required=True, nargs="+", help="method folders (clean/, recovered/)"
    )
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default="/tmp/raeg_probe_cache", help="decode cache folder")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for export in args.export:
        clean, _, _ = load_split_cached(f"{export}/clean/train", args.cache, "RGB", None)
        rec, _, _ = load_split_cached(f"{export}/recovered/train", args.cache, "RGB", None)
        if clean.files != rec.files:
            raise SystemExit(f"{export}: clean/train and recovered/train hold different files")
        residual = rec.images.float() - clean.images.float()
        share = class_structure(clean.images, rec.images, clean.labels)["classmean_share"]
        acc = probe_accuracy(residual / 4.0, clean.labels, args.epochs, args.seed)
        print(
            f"{export}: residual RMSE {float(residual.pow(2).mean().sqrt()):.2f} levels, "
            f"class-mean share {100 * share:.1f}%, label from the residual alone "
            f"{100 * acc:.1f}% held out (chance {100 / (int(clean.labels.max()) + 1):.0f}%)",
            flush=True,
        )


if __name__ == "__main__":
    main()
