"""bf16 against float32 on this CPU: whether the presets' ``bf16-mixed`` pays here.

One training step (forward, backward, SGD) of each quick-profile classifier family at batch
64 on 32x32 images, timed in float32 and under bf16 autocast, one after the other in one
process and one thread; the figure of merit is the ratio of the two, meaningful on any
machine. It also prints what the Trainers of this project run with here
(:func:`raeg_pl.utils.trainer.effective_precision`): ``32-true`` on a CPU whose bf16 is
emulated, where the ratio is far above 1.

    .venv/bin/python benchmarks/bench_precision.py [--steps 5] [--archs resnet_tiny_cifar ...]

Writes ``runs/benchmarks/precision.json``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from raeg_pl.models.classifier import create_classifier
from raeg_pl.utils.files import write_atomic_text
from raeg_pl.utils.trainer import cpu_has_fast_bf16, effective_precision

ARCHS = ("resnet_tiny_cifar", "vgg_tiny_cifar", "mobilenet_tiny_cifar", "vit_micro_cifar")


def seconds_per_step(arch: str, bf16: bool, steps: int, batch: int = 64) -> float:
    torch.manual_seed(0)
    model = create_classifier(arch, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up: allocations, oneDNN primitive creation
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/benchmarks/precision.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = {}
    for arch in args.archs:
        fp32 = seconds_per_step(arch, False, args.steps)
        bf16 = seconds_per_step(arch, True, args.steps)
        rows[arch] = {
            "fp32_s": round(fp32, 4),
            "bf16_s": round(bf16, 4),
            "bf16/fp32": round(bf16 / fp32, 2),
        }
        print(
            f"{arch:24s} fp32 {fp32:.3f} s/step  bf16 {bf16:.3f} s/step  bf16/fp32 {bf16 / fp32:.2f}x"
        )
    report = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": cpu_has_fast_bf16(),
        "trainers_run_bf16_mixed_as": effective_precision("bf16-mixed", "cpu"),
        "threads": args.threads,
        "steps": args.steps,
        "archs": rows,
    }
    print(
        f"CPU {report['cpu_capability']}, native bf16: {report['native_bf16']}; "
        f"bf16-mixed runs as {report['trainers_run_bf16_mixed_as']}"
    )
    write_atomic_text(args.out, json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
