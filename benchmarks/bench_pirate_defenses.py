"""Cost of the adaptive pirate defences at the quick profile, on this machine.

Measures, for the quick profile's ResNet pirate (``resnet_tiny_cifar``, batch 256, 9,500
training images, 10 epochs: 370 steps): the time of a plain training step, of a step with
UEraser augmentation (``ueraser``) and of a step with PGD adversarial training
(``adv_train:eps=8,steps=N``); and, on 9,500 real CIFAR-10 training images, the time of
class-pattern removal (``classpattern``) and of the learned inverse (``inverse:k=K``: fit
on K pairs, applied to every image). Prints the seconds each defence adds per pirate.

    RAEG_DATA_DIR=... python benchmarks/bench_pirate_defenses.py [--adv_steps 4] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from raeg_pl.data.cache import default_cache_dir, load_split_cached
from raeg_pl.data.datamodule import resolve_data_root
from raeg_pl.defenses.pirate import (
    INVERSE_STEPS,
    learned_inverse_uint8,
    remove_class_patterns_uint8,
)
from raeg_pl.lit.classifier import ClassifierLitModule

PIRATE_STEPS = 370  # 9,500 images / batch 256 (last batch dropped) x 10 epochs


def step_seconds(model_kw: dict, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Mean seconds of one optimiser step of the quick ResNet pirate (after 2 warm-up steps)."""
    lit = ClassifierLitModule(arch="resnet_tiny_cifar", **model_kw)
    lit.log = lambda *a, **k: None
    opt = torch.optim.SGD(lit.parameters(), lr=0.1, momentum=0.9)
    lit.train()
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        loss = lit.training_step((x, y), i)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adv_steps", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per variant")
    ap.add_argument("--inverse_steps", type=int, default=INVERSE_STEPS)
    ns = ap.parse_args()
    torch.manual_seed(0)
    x, y = torch.rand(256, 3, 32, 32), torch.randint(10, (256,))
    out: dict = {"threads": torch.get_num_threads(), "load_avg": os.getloadavg()}
    plain = step_seconds({}, x, y, ns.steps)
    uer = step_seconds({"train_augment": "ueraser"}, x, y, ns.steps)
    adv = step_seconds({"adv_train_eps": 8.0, "adv_train_steps": ns.adv_steps}, x, y, ns.steps)
    out["step_s"] = {"plain": plain, "ueraser": uer, f"adv_train_steps{ns.adv_steps}": adv}
    out["pirate_s_plain"] = plain * PIRATE_STEPS
    out["added_s_per_pirate"] = {
        "ueraser": (uer - plain) * PIRATE_STEPS,
        f"adv_train:eps=8,steps={ns.adv_steps}": (adv - plain) * PIRATE_STEPS,
    }
    split, _, _ = load_split_cached(
        resolve_data_root(None) / "cifar10" / "train", default_cache_dir(), "RGB"
    )
    pick = torch.randperm(len(split.labels), generator=torch.Generator().manual_seed(0))[:9500]
    images, labels = split.images[pick], split.labels[pick]
    t0 = time.perf_counter()
    remove_class_patterns_uint8(images, labels, 10)
    out["added_s_per_pirate"]["classpattern"] = time.perf_counter() - t0
    for k in (100, 1000):
        t0 = time.perf_counter()
        _, stats = learned_inverse_uint8(
            images, labels, 10, torch.arange(k), images[:k], steps=ns.inverse_steps
        )
        out["added_s_per_pirate"][f"inverse:k={k}"] = time.perf_counter() - t0
        out[f"inverse_k{k}_fit_s"] = stats["fit_seconds"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
