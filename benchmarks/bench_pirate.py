"""Pirate-training throughput: the fast on-device data path vs a plain torchvision-style one.

Both paths train the same classifier (``ClassifierLitModule``, same architecture, optimiser
and schedule) with a Lightning Trainer on the same CIFAR-10 training images, with the same
batch size and number of steps, in one process, one after the other:

  * fast: ``ImageClassificationDataModule(on_device=True)``: the uint8 split lives on the
    training device, batches are gathered there, crop + flip run batched on the device
    (``on_after_batch_transfer``); channels-last model, bf16 autocast, optionally
    ``torch.compile``;
  * plain: a ``Dataset`` that opens and decodes each image's JPEG file with PIL, per-sample
    ``RandomCrop(32, padding=4, reflect) + RandomHorizontalFlip + ToTensor`` in
    ``--workers`` DataLoader workers; fp32, contiguous memory format.

Images per second count training steps only (data, forward, backward, optimiser), timed
from the end of the warm-up steps to the end of the last step. The figure of merit is the
ratio fast/plain measured in the same run; absolute numbers depend on the machine and its
load (the load averages are recorded; ``--rounds`` repeats the pair in alternating order
and reports medians, for shared machines).

    .venv/bin/python benchmarks/bench_pirate.py [--device cpu] [--steps 20] [--compile]

Writes ``runs/benchmarks/pirate.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from raeg_pl.data import ImageClassificationDataModule
from raeg_pl.lit.classifier import ClassifierLitModule


class JpegFolderSubset(Dataset):
    """Training images read as a torchvision ImageFolder reads them: one JPEG per item.

    Args:
        root: the split's folder.
        files: image paths relative to ``root``.
        labels: (N,) int64 class indices.
        transform: per-sample transform of a PIL image to a (C, H, W) float tensor.
    """

    def __init__(self, root: Path, files: list[str], labels: torch.Tensor, transform) -> None:
        self.root = root
        self.files = files
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.root / self.files[i]) as im:
            image = im.convert("RGB")
        return self.transform(image), self.labels[i]


class StepTimer(L.Callback):
    """Times the training steps after ``warmup`` until ``warmup + steps`` have ended."""

    def __init__(self, warmup: int, steps: int, cuda: bool) -> None:
        self.warmup, self.steps, self.cuda = warmup, steps, cuda
        self.done = self.images = 0
        self.t0 = self.t1 = 0.0
        self.ends: list[float] = []

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.done += 1
        if self.done == self.warmup:
            self.t0 = self._now()
            self.ends = [self.t0]
        elif self.done > self.warmup:
            self.images += len(batch[1])
            if self.done == self.warmup + self.steps:
                self.t1 = self._now()
                self.ends.append(self.t1)
            else:
                self.ends.append(time.perf_counter())

    @property
    def images_per_s(self) -> float:
        return self.images / (self.t1 - self.t0)

    @property
    def median_step_ms(self) -> float:
        # Robust to a few steps slowed by other work on a shared machine.
        return 1e3 * statistics.median(b - a for a, b in zip(self.ends, self.ends[1:]))


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fit(module, args, precision: str, **fit_kwargs) -> StepTimer:
    cuda = args.device == "cuda"
    timer = StepTimer(args.warmup, args.steps, cuda)
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision=precision,
        max_epochs=-1,
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        default_root_dir=args.root_dir,
    )
    trainer.fit(module, **fit_kwargs)
    if timer.done != args.warmup + args.steps:
        raise RuntimeError(f"ran {timer.done} steps, expected {args.warmup + args.steps}")
    return timer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    ap.add_argument("--images", type=int, default=5000, help="training images (10 classes)")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per path")
    ap.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--arch", default="resnet_tiny_cifar")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers, plain path")
    ap.add_argument("--compile", action="store_true", help="torch.compile the fast model")
    ap.add_argument("--fast-precision", default="bf16-mixed", help="Lightning precision, fast")
    ap.add_argument(
        "--rounds", type=int, default=1, help="fast/plain pairs, order alternating; medians"
    )
    ap.add_argument("--root-dir", default="runs/benchmarks/pirate_trainer")
    ap.add_argument("--out", default="runs/benchmarks/pirate.json")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.images % 10:
        raise SystemExit("--images must be a multiple of 10 (equal images per class)")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*no `val_dataloader`.*")
    load_before = os.getloadavg()

    dm = ImageClassificationDataModule(
        batch_size=args.batch_size,
        train_per_class=args.images // 10,
        download=False,
        on_device=True,
    )
    dm.prepare_data()
    dm.setup()
    train_root = dm.locate().train
    if train_root is None:
        raise SystemExit("the plain path reads JPEG files: needs CIFAR-10 as an ImageFolder")
    if len(dm.train_set) < args.batch_size:
        raise SystemExit(f"--images {args.images} is smaller than one batch")

    transform = T.Compose(
        [
            T.RandomCrop(32, padding=4, padding_mode="reflect"),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
        ]
    )
    plain_set = JpegFolderSubset(train_root, dm.train_files, dm.train_set.labels, transform)

    def run_fast() -> StepTimer:
        # Data on the device, batched uint8 crop + flip there, channels-last, bf16.
        L.seed_everything(0, verbose=False)
        module = ClassifierLitModule(arch=args.arch, num_classes=dm.num_classes, channels_last=True)
        if args.compile:
            module.model = torch.compile(module.model)
        return _fit(module, args, args.fast_precision, datamodule=dm)

    def run_plain() -> StepTimer:
        # The same images as JPEG files, decoded and transformed per sample in workers.
        loader = DataLoader(
            plain_set,
            batch_size=args.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=args.workers,
            persistent_workers=args.workers > 0,
            pin_memory=args.device == "cuda",
        )
        L.seed_everything(0, verbose=False)
        module = ClassifierLitModule(
            arch=args.arch, num_classes=dm.num_classes, channels_last=False
        )
        return _fit(module, args, "32-true", train_dataloaders=loader)

    rounds = []
    for r in range(args.rounds):
        # Alternating the order cancels a load that drifts during the run.
        if r % 2 == 0:
            fast_r, plain_r = run_fast(), run_plain()
        else:
            plain_r, fast_r = run_plain(), run_fast()
        rounds.append(
            {
                "fast": round(fast_r.images_per_s, 1),
                "plain": round(plain_r.images_per_s, 1),
                "fast_median_step_ms": round(fast_r.median_step_ms, 1),
                "plain_median_step_ms": round(plain_r.median_step_ms, 1),
            }
        )
        print(f"round {r + 1}/{args.rounds}: {rounds[-1]}")
    fast_ips = statistics.median(x["fast"] for x in rounds)
    plain_ips = statistics.median(x["plain"] for x in rounds)
    speedup = statistics.median(x["fast"] / x["plain"] for x in rounds)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name()
    result = {
        "benchmark": "pirate training throughput, on-device fast path vs torchvision-style path",
        "device": args.device,
        "device_name": device_name,
        "arch": args.arch,
        "images": len(dm.train_set),
        "batch_size": args.batch_size,
        "warmup_steps": args.warmup,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "fast": {
            "data": "uint8 tensors on the device, batched crop+flip there",
            "precision": args.fast_precision,
            "memory_format": "channels_last",
            "compile": args.compile,
            "img_per_s": round(fast_ips, 1),
        },
        "plain": {
            "data": "PIL decode of the CIFAR-10 JPEG files + per-sample torchvision transforms",
            "workers": args.workers,
            "precision": "32-true",
            "memory_format": "contiguous",
            "img_per_s": round(plain_ips, 1),
        },
        "rounds": rounds,
        "speedup": round(speedup, 2),
    }
    rows = [
        ("path", "data", "precision", "format", "img/s"),
        (
            "fast",
            "on-device uint8, batched aug" + (", compiled" if args.compile else ""),
            args.fast_precision,
            "channels_last",
            f"{fast_ips:.1f}",
        ),
        ("plain", f"JPEG+PIL, {args.workers} workers", "32-true", "contiguous", f"{plain_ips:.1f}"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    print(
        f"speedup fast/plain: {result['speedup']:.2f}x  ({args.arch}, batch {args.batch_size}, "
        f"{args.steps} steps, {args.device}: {result['device_name']})"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
