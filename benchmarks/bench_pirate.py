"""Pirate-training throughput: data path and precision measured apart, and a step profile.

Four runs train the same classifier (``ClassifierLitModule``, same architecture, optimiser
and schedule) with a Lightning Trainer on the same CIFAR-10 training images, with the same
batch size and number of steps, in one process, one after the other:

  * ``fast``: ``ImageClassificationDataModule(on_device=True)``: the uint8 split lives on
    the training device, batches are gathered there, crop + flip run batched on the device
    (``on_after_batch_transfer``); channels-last model, ``--fast-precision`` (bf16
    autocast), optionally ``torch.compile``;
  * ``fast_fp32``: the same data path and memory format in fp32;
  * ``plain``: a ``Dataset`` that opens and decodes each image's JPEG file with PIL,
    per-sample ``RandomCrop(32, padding=4, reflect) + RandomHorizontalFlip + ToTensor`` in
    ``--workers`` DataLoader workers; contiguous memory format, fp32;
  * ``plain_lowp``: the plain data path at the fast path's precision.

So ``fast / plain_lowp`` and ``fast_fp32 / plain`` are the data path (with its memory
format) at one precision each, ``fast / fast_fp32`` and ``plain_lowp / plain`` the precision
on one data path each, and ``fast / plain`` both together.

Images per second count training steps only (data, forward, backward, optimiser), timed
from the end of the warm-up steps to the end of the last step. Absolute numbers depend on
the machine and its load (the load averages are recorded); ``--rounds`` repeats the four
runs, reversing their order every other round, and reports medians, for shared machines.

A last run profiles the fast path's step with ``torch.profiler`` (``--profile-steps``
steps after the warm-up, 0 to skip): Lightning's actions are recorded as profiler ranges,
and their times are summed into data (gather, transfer hook with crop + flip), forward
(``training_step``: forward and loss), backward, optimiser (the update and zero_grad, i.e.
``optimizer_step`` less the forward and backward it runs in its closure) and the rest of
the step (callbacks, logging, loop); with the operators taking the most self time. Profiler
overhead inflates every part a little; the split, not the sum, is the result.

    .venv/bin/python benchmarks/bench_pirate.py [--device cpu] [--steps 20] [--compile]
        [--rounds N] [--threads T] [--profile-steps S]

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
from collections import defaultdict
from contextlib import ExitStack
from pathlib import Path

import lightning as L
import torch
import torchvision.transforms as T
from lightning.pytorch.profilers import Profiler
from PIL import Image
from torch.profiler import ProfilerActivity, profile, record_function, schedule
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


class RangeProfiler(Profiler):
    """A Lightning profiler that marks each of Lightning's actions as a ``torch.profiler`` range.

    Lightning names its actions (``[Strategy]SingleDeviceStrategy.backward``,
    ``[_TrainingEpochLoop].train_dataloader_next``...); inside a ``torch.profiler.profile``
    their times appear in ``key_averages()`` under those names, beside the operators.
    """

    def __init__(self) -> None:
        super().__init__()
        self._open: dict[str, list] = defaultdict(list)

    def start(self, action_name: str) -> None:
        scope = record_function(action_name)
        scope.__enter__()
        self._open[action_name].append(scope)

    def stop(self, action_name: str) -> None:
        if self._open[action_name]:
            self._open[action_name].pop().__exit__(None, None, None)


class ProfilerStepper(L.Callback):
    """Advances a ``torch.profiler`` schedule at the end of every training step."""

    def __init__(self, prof) -> None:
        self.prof = prof

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.prof.step()


# Lightning actions (matched by their endings) summed into each part of the step.
PHASES = {
    "data": (".train_dataloader_next", ".batch_to_device"),
    "forward": ("Strategy.training_step", "]SingleDeviceStrategy.training_step"),
    "backward": ("Strategy.backward", "]SingleDeviceStrategy.backward"),
    "optimizer_step": (".optimizer_step",),
    "zero_grad": (".optimizer_zero_grad",),
}


def profile_summary(events, steps: int, wall_ms: float, top: int = 12) -> dict:
    """Where the time of ``steps`` profiled training steps went.

    Args:
        events: ``prof.key_averages()`` of the profiled steps.
        steps: profiled steps.
        wall_ms: their wall time in milliseconds (profiler overhead included).
        top: operators listed.

    Returns:
        Per-step milliseconds and shares of data, forward, backward, optimiser and the rest,
        and the ``top`` operators by self time (CPU; on CUDA also their device time).
    """
    by_name = {e.key: e for e in events}

    def total_ms(endings: tuple[str, ...]) -> float:
        keys = [k for k in by_name if k.startswith("[") and k.endswith(endings)]
        return sum(by_name[k].cpu_time_total for k in keys) / 1e3

    parts = {name: total_ms(endings) for name, endings in PHASES.items()}
    # optimizer_step runs the forward and backward in its closure: the update is the rest.
    optimiser = parts["optimizer_step"] - parts["forward"] - parts["backward"]
    split = {
        "data": parts["data"],
        "forward": parts["forward"],
        "backward": parts["backward"],
        "optimiser": max(0.0, optimiser) + parts["zero_grad"],
    }
    split["other"] = max(0.0, wall_ms - sum(split.values()))
    ops = sorted(
        (
            e
            for e in events
            if not e.key.startswith(("[", "ProfilerStep")) and e.key != "run_training_batch"
        ),
        key=lambda e: e.self_cpu_time_total,
        reverse=True,
    )[:top]
    self_total = sum(e.self_cpu_time_total for e in events) / 1e3
    return {
        "steps": steps,
        "step_ms": round(wall_ms / steps, 1),
        "per_step_ms": {k: round(v / steps, 1) for k, v in split.items()},
        "share": {k: round(v / wall_ms, 3) for k, v in split.items()},
        # Lightning's own actions, nested ones inside their parents' times.
        "actions_ms_per_step": {
            e.key: round(e.cpu_time_total / 1e3 / steps, 2)
            for e in sorted(events, key=lambda e: -e.cpu_time_total)
            if e.key.startswith("[") or e.key == "run_training_batch"
        },
        "top_ops_self_cpu": [
            {
                "op": e.key,
                "calls_per_step": round(e.count / steps, 1),
                "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 2),
                "share_of_self_cpu": round(e.self_cpu_time_total / 1e3 / self_total, 3),
                **(
                    {"self_device_ms_per_step": round(e.self_device_time_total / 1e3 / steps, 2)}
                    if getattr(e, "self_device_time_total", 0)
                    else {}
                ),
            }
            for e in ops
        ],
    }


def _fit(
    module, args, precision: str, extra_callbacks=(), profiler=None, **fit_kwargs
) -> StepTimer:
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
        callbacks=[timer, *extra_callbacks],
        profiler=profiler,
        default_root_dir=args.root_dir,
    )
    trainer.fit(module, **fit_kwargs)
    if timer.done != args.warmup + args.steps:
        raise RuntimeError(f"ran {timer.done} steps, expected {args.warmup + args.steps}")
    return timer


# name -> (data path, memory format, precision), the precision filled in from the arguments.
def _paths(fast_precision: str) -> dict[str, tuple[str, str, str]]:
    return {
        "fast": ("device", "channels_last", fast_precision),
        "fast_fp32": ("device", "channels_last", "32-true"),
        "plain": ("jpeg", "contiguous", "32-true"),
        "plain_lowp": ("jpeg", "contiguous", fast_precision),
    }


# ratio name -> (numerator, denominator, what it isolates)
RATIOS = {
    "fast/plain": ("fast", "plain", "data path, memory format and precision together"),
    "fast/plain_lowp": ("fast", "plain_lowp", "data path (+ memory format), low precision"),
    "fast_fp32/plain": ("fast_fp32", "plain", "data path (+ memory format), fp32"),
    "fast/fast_fp32": ("fast", "fast_fp32", "precision on the fast data path"),
    "plain_lowp/plain": ("plain_lowp", "plain", "precision on the plain data path"),
}


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
    ap.add_argument(
        "--fast-precision", default="bf16-mixed", help="Lightning precision, fast and plain_lowp"
    )
    ap.add_argument("--rounds", type=int, default=1, help="runs of the four paths; medians")
    ap.add_argument(
        "--profile-steps", type=int, default=10, help="profiled fast-path steps (0: no profile)"
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch threads (0: torch's default); 1 on a shared, oversubscribed CPU",
    )
    ap.add_argument("--root-dir", default="runs/benchmarks/pirate_trainer")
    ap.add_argument("--out", default="runs/benchmarks/pirate.json")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.images % 10:
        raise SystemExit("--images must be a multiple of 10 (equal images per class)")
    if args.fast_precision in ("32-true", "32"):
        raise SystemExit("--fast-precision must be a lower precision than fp32 (e.g. bf16-mixed)")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
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
    paths = _paths(args.fast_precision)

    def module_for(memory_format: str, compiled: bool) -> ClassifierLitModule:
        L.seed_everything(0, verbose=False)
        module = ClassifierLitModule(
            arch=args.arch,
            num_classes=dm.num_classes,
            channels_last=memory_format == "channels_last",
        )
        if compiled:
            module.model = torch.compile(module.model)
        return module

    def run(name: str, **fit_extra) -> StepTimer:
        data, memory_format, precision = paths[name]
        if data == "device":
            # Data on the device, batched uint8 crop + flip there.
            module = module_for(memory_format, args.compile)
            return _fit(module, args, precision, datamodule=dm, **fit_extra)
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
        module = module_for(memory_format, False)
        return _fit(module, args, precision, train_dataloaders=loader, **fit_extra)

    rounds = []
    for r in range(args.rounds):
        # Reversing the order every other round cancels a load that drifts during the run.
        order = list(paths) if r % 2 == 0 else list(reversed(paths))
        timers = {name: run(name) for name in order}
        rounds.append(
            {
                **{name: round(timers[name].images_per_s, 1) for name in paths},
                **{
                    f"{name}_median_step_ms": round(timers[name].median_step_ms, 1)
                    for name in paths
                },
            }
        )
        print(f"round {r + 1}/{args.rounds}: {rounds[-1]}")
    ips = {name: statistics.median(x[name] for x in rounds) for name in paths}
    ratios = {
        key: round(statistics.median(x[a] / x[b] for x in rounds), 2)
        for key, (a, b, _) in RATIOS.items()
    }

    profile_result = None
    if args.profile_steps > 0:
        activities = [ProfilerActivity.CPU]
        if args.device == "cuda":
            activities.append(ProfilerActivity.CUDA)
        steps, warmup = args.steps, args.warmup
        args.steps = args.profile_steps
        # Record only the steps after the warm-up (the first ones build kernels and caches).
        sched = schedule(
            wait=max(0, args.warmup - 1), warmup=min(1, args.warmup), active=args.steps
        )
        with ExitStack() as stack:
            prof = stack.enter_context(profile(activities=activities, schedule=sched))
            timer = run("fast", extra_callbacks=[ProfilerStepper(prof)], profiler=RangeProfiler())
        wall_ms = 1e3 * (timer.t1 - timer.t0)
        profile_result = {
            "path": "fast",
            "note": "torch.profiler over Lightning's actions; profiler overhead included",
            **profile_summary(prof.key_averages(), args.steps, wall_ms),
        }
        args.steps, args.warmup = steps, warmup

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name()
    result = {
        "benchmark": "pirate training throughput: data path and precision apart, fast-step profile",
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
        "paths": {
            name: {
                "data": (
                    "uint8 tensors on the device, batched crop+flip there"
                    if data == "device"
                    else f"PIL decode of the JPEG files + per-sample torchvision transforms, "
                    f"{args.workers} workers"
                ),
                "memory_format": memory_format,
                "precision": precision,
                "compile": args.compile and data == "device",
                "img_per_s": round(ips[name], 1),
            }
            for name, (data, memory_format, precision) in paths.items()
        },
        "ratios": ratios,
        "ratio_meaning": {key: what for key, (_, _, what) in RATIOS.items()},
        "rounds": rounds,
        "profile": profile_result,
    }
    rows = [("path", "data", "precision", "format", "img/s")]
    for name, (data, memory_format, precision) in paths.items():
        source = "on-device uint8, batched aug" if data == "device" else "JPEG+PIL"
        if data == "device" and args.compile:
            source += ", compiled"
        rows.append((name, source, precision, memory_format, f"{ips[name]:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    for key, (_, _, what) in RATIOS.items():
        print(f"{key:18s} {ratios[key]:5.2f}x  ({what})")
    if profile_result is not None:
        shares = ", ".join(
            f"{k} {v:.0%} ({profile_result['per_step_ms'][k]} ms)"
            for k, v in profile_result["share"].items()
        )
        print(f"fast step {profile_result['step_ms']} ms (profiled): {shares}")
    print(
        f"({args.arch}, batch {args.batch_size}, {args.steps} steps, {args.device}: {device_name})"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
