"""CUDA paths on a GPU machine: the device, bf16 autocast, and DDP over NCCL.

Run on a machine with a CUDA GPU (CI has none, so nothing here is a test):

  * ``device``: torch and CUDA versions, the GPU's name, capability and memory;
  * ``amp``: a bf16-autocast matrix product agrees with fp32 within bf16's precision, and
    the autocast forward of a project classifier gives bf16 logits;
  * ``ddp``: a Lightning ``Trainer(strategy="ddp")`` on every visible GPU trains a project
    classifier for a few steps; inside the step the process group's backend must be NCCL,
    and an all-reduce of each rank's index must give the sum over ranks.

Each check records ``ok`` and its error rather than stopping the others. The remaining CUDA
paths are covered by running the experiment smoke test on the GPU (every stage of every
experiment file, paper profiles included, one step in bf16)::

    RAEG_SMOKE_ACCELERATOR=gpu python -m pytest tests/configs/test_smoke.py

and pirate throughput by ``benchmarks/bench_pirate.py --device cuda``.

    python benchmarks/cuda_check.py [--out runs/benchmarks/cuda_check.json]
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from raeg_pl.lit.classifier import ClassifierLitModule


def check_device() -> dict:
    """The torch build and the GPU it sees."""
    props = torch.cuda.get_device_properties(0)
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpus": torch.cuda.device_count(),
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "bf16": torch.cuda.is_bf16_supported(),
    }


def check_amp() -> dict:
    """bf16 autocast: a matrix product within bf16 precision of fp32; bf16 classifier logits."""
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(512, 512, device="cuda", generator=g)
    b = torch.randn(512, 512, device="cuda", generator=g)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = a @ b
    ref = a @ b
    rel = float((low.float() - ref).norm() / ref.norm())
    net = ClassifierLitModule(arch="resnet_air_small_cifar").cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = net(torch.rand(8, 3, 32, 32, device="cuda"))
    ok = low.dtype == torch.bfloat16 and rel < 2e-2 and logits.dtype == torch.bfloat16
    return {"ok": ok, "matmul_rel_error": rel, "logits_dtype": str(logits.dtype)}


class _DDPProbe(L.Callback):
    """Records the process group's backend and an all-reduce inside the training loop."""

    def __init__(self) -> None:
        self.seen: dict = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.seen:
            return
        import torch.distributed as dist

        value = torch.tensor([float(trainer.global_rank)], device=pl_module.device)
        dist.all_reduce(value)
        world = trainer.world_size
        self.seen = {
            "initialized": dist.is_initialized(),
            "backend": dist.get_backend(),
            "world_size": world,
            "all_reduce": float(value.item()),
            "all_reduce_expected": float(world * (world - 1) / 2),
        }


def check_ddp(steps: int = 4) -> dict:
    """A few DDP training steps of a project classifier on every visible GPU over NCCL."""
    probe = _DDPProbe()
    images = torch.rand(256, 3, 32, 32)
    labels = torch.randint(0, 10, (256,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=32)
    model = ClassifierLitModule(arch="resnet_air_small_cifar", scheduler="none")
    trainer = L.Trainer(
        accelerator="gpu",
        devices=-1,
        strategy="ddp",
        precision="bf16-mixed",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[probe],
    )
    t0 = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader)
    seen = probe.seen
    ok = (
        seen.get("backend") == "nccl"
        and seen.get("all_reduce") == seen.get("all_reduce_expected")
        and trainer.global_step == steps
    )
    seconds = time.perf_counter() - t0
    return {"ok": ok, **seen, "steps": trainer.global_step, "seconds": seconds}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/benchmarks/cuda_check.json")
    ns = ap.parse_args()
    if not torch.cuda.is_available():
        print("cuda_check: no CUDA device; nothing to check")
        return 2
    report: dict = {}
    for name, fn in (("device", check_device), ("amp", check_amp), ("ddp", check_ddp)):
        try:
            report[name] = fn()
        except Exception as e:  # noqa: BLE001 - every check reports, none stops the others
            report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
        print(name, json.dumps(report[name]), flush=True)
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    failed = [k for k, v in report.items() if v.get("ok") is False]
    print(f"cuda_check: {'failed: ' + ', '.join(failed) if failed else 'all ok'}; {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
