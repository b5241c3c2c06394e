"""Protector training-step and export throughput, and where a training step's time goes.

One process, one machine, all variants measured back to back on the same batch:

* ``full``: the training step of ProtectorLitModule (INN forward, straight-through 8-bit
  storage, INN inverse, surrogate on the defended image and on the recovered image, backward);
* ``no_defense``: the same with the identity defence;
* ``inn_only``: fidelity + recovery terms only (the warm-up step);
* ``label_conditioned``: the full step with the label-conditioned generator (the default of
  the experiments), reported as a ratio to the unconditioned one.

Shares of the full step: INN = inn_only / full, surrogates = (no_defense - inn_only) / full,
defence = (full - no_defense) / full. Export: protected PNG export against a plain PNG copy
of the same images (ratio), both through the one writer in ``raeg_pl.io``.

    .venv/bin/python benchmarks/bench_protector.py [--batch-size 64] [--steps 10]

Writes ``runs/benchmarks/protector.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from raeg_pl.defenses import get_defense
from raeg_pl.io.protected import write_image_folder
from raeg_pl.losses import (
    fidelity_loss,
    keep_classifiable_loss,
    quantize_ste,
    recovery_loss,
    targeted_adversarial_loss,
)
from raeg_pl.models.classifier import create_classifier
from raeg_pl.models.protector import InvertibleProtector


def _time(fn, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--levels", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--surrogate", default="resnet_tiny_cifar")
    ap.add_argument("--defense", default="jpeg_ste:q=75")
    ap.add_argument("--export-images", type=int, default=1024)
    ap.add_argument("--out", default="runs/benchmarks/protector.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.batch_size, 3, 32, 32), generator=g).float() / 255
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    net = InvertibleProtector(3, args.levels, args.blocks, args.hidden)
    net_cond = InvertibleProtector(3, args.levels, args.blocks, args.hidden, num_classes=10)
    # Random (non-identity) weights, as after some training.
    with torch.no_grad():
        for p in [*net.parameters(), *net_cond.parameters()]:
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    surrogate = create_classifier(args.surrogate, 10).eval().to(memory_format=torch.channels_last)
    for p in surrogate.parameters():
        p.requires_grad_(False)
    opts = {id(n): torch.optim.Adam(n.parameters(), lr=1e-4) for n in (net, net_cond)}

    def step(defense: str | None, adversarial: bool = True, gen=net) -> None:
        opt = opts[id(gen)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            protected = gen(x, y)
            stored = quantize_ste(protected)
            recovered = gen.inverse(stored, y)
            loss = fidelity_loss(protected, x) + recovery_loss(recovered, x)
            if adversarial:
                d = get_defense(defense or "identity")
                logits = surrogate(d.differentiable(stored))
                loss = loss + 0.1 * targeted_adversarial_loss(logits, (y + 1) % 10)
                loss = loss + 0.005 * keep_classifiable_loss(surrogate(recovered), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    full = _time(lambda: step(args.defense), args.steps)
    no_def = _time(lambda: step(None), args.steps)
    inn = _time(lambda: step(None, adversarial=False), args.steps)
    cond = _time(lambda: step(args.defense, gen=net_cond), args.steps)
    full_again = _time(lambda: step(args.defense), args.steps)  # brackets drift in load

    images = torch.randint(0, 256, (args.export_images, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.arange(args.export_images) % 10
    classes = [f"c{i}" for i in range(10)]
    files = [f"c{int(labels[i])}/{i:05d}.jpg" for i in range(args.export_images)]
    net.eval()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_image_folder(Path(tmp) / "copy", images, labels, classes, files, kind="clean")
        copy_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_image_folder(
            Path(tmp) / "prot", images, labels, classes, files, kind="protected", transform=net
        )
        export_s = time.perf_counter() - t0
    n = args.export_images
    result = {
        "benchmark": "protector training step and export",
        "batch_size": args.batch_size,
        "protector": net.config,
        "surrogate": args.surrogate,
        "defense": args.defense,
        "threads": torch.get_num_threads(),
        "train_img_per_s": round(args.batch_size / full, 1),
        "train_step_s": {
            "full": round(full, 4),
            "no_defense": round(no_def, 4),
            "inn_only": round(inn, 4),
            "label_conditioned": round(cond, 4),
        },
        "label_conditioned_vs_plain_step": round(cond / ((full + full_again) / 2), 3),
        "share_of_step": {
            "inn": round(inn / full, 3),
            "surrogates": round(max(0.0, no_def - inn) / full, 3),
            "defense": round(max(0.0, full - no_def) / full, 3),
        },
        "export_img_per_s": round(n / export_s, 1),
        "plain_png_copy_img_per_s": round(n / copy_s, 1),
        "export_vs_copy_ratio": round(copy_s / export_s, 3),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
