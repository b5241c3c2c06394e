"""Classifier training throughput: cached tensor pipeline vs a plain per-epoch ImageFolder loader.

Both paths train the same CPU-profile classifier with the same optimiser, precision and
augmentation (random crop with 4-pixel padding + horizontal flip) for the same number of
steps, in one process, one after the other; the figure of merit is the ratio of their
images per second, which is meaningful on any machine.

    .venv/bin/python benchmarks/bench_data_pipeline.py [--steps 60] [--batch-size 256]

Writes ``runs/benchmarks/data_pipeline.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from raeg_pl.data import ImageClassificationDataModule
from raeg_pl.data.augment import random_crop_flip
from raeg_pl.data.datamodule import resolve_data_root
from raeg_pl.models.classifier import create_classifier


def _trainer(arch: str, bf16: bool):
    model = create_classifier(arch, 10).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _run(batches, step, steps: int, warmup: int = 3) -> float:
    it = iter(batches)
    n = 0
    t0 = None
    for i in range(steps + warmup):
        if i == warmup:
            t0 = time.perf_counter()
        images, labels = next(it)
        step(images, labels)
        if i >= warmup:
            n += len(labels)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--arch", default="resnet_tiny_cifar")
    ap.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="DataLoader workers of the plain path",
    )
    ap.add_argument("--fp32", action="store_true", help="disable bf16 autocast")
    ap.add_argument("--out", default="runs/benchmarks/data_pipeline.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    bf16 = not args.fp32

    # Cached path: uint8 tensors in memory, float conversion + augmentation on the batch.
    dm = ImageClassificationDataModule(batch_size=args.batch_size, download=False)
    dm.prepare_data()
    dm.setup()

    def cached_batches():
        while True:
            for images, labels in dm.train_dataloader():
                yield random_crop_flip(images.float().div_(255), 4, True), labels

    # Plain path: decode and transform each JPEG in DataLoader workers, every epoch.
    root = dm.locate().train or resolve_data_root(None) / "cifar10" / "train"
    plain_ds = ImageFolder(
        str(root),
        transform=T.Compose(
            [
                T.RandomCrop(32, padding=4, padding_mode="reflect"),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
            ]
        ),
    )
    plain = DataLoader(
        plain_ds,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )

    def plain_batches():
        while True:
            yield from plain

    cached_ips = _run(cached_batches(), _trainer(args.arch, bf16), args.steps)
    plain_ips = _run(plain_batches(), _trainer(args.arch, bf16), args.steps)
    result = {
        "benchmark": "classifier training throughput, cached tensors vs ImageFolder DataLoader",
        "arch": args.arch,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "precision": "bf16-mixed" if bf16 else "fp32",
        "plain_workers": args.workers,
        "threads": torch.get_num_threads(),
        "cached_img_per_s": round(cached_ips, 1),
        "plain_img_per_s": round(plain_ips, 1),
        "speedup": round(cached_ips / plain_ips, 2),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
