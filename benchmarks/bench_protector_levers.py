"""What each ablation row's recipe costs per protector training step, against the grid's `full`.

The step timed is the real one: ``ProtectorLitModule.training_step`` (every term of the row's
recipe), backward and the Adam step, on a batch of CIFAR-10 training images decoded from
``$RAEG_DATA_DIR/cifar10/train`` (cached in ``$RAEG_CACHE_DIR``), with the grid's surrogate
architectures (untrained weights: the cost does not depend on them). Each row's protector
config comes from the grid file through :func:`raeg_pl.config.row_protector_spec`, with the
warm-up and the adversarial ramp set to zero so that every term is on from the first step.
A row whose simulated pirate is fitted afresh (``invadv_refit_every``) also gets that fit
timed once and spread over the steps between fits. All rows run back to back in one
process, and the first row again at the end, so a drift in the machine's load shows as the
two ``full`` figures differing; read the ratios, not the seconds.

    .venv/bin/python benchmarks/bench_protector_levers.py [--config experiments/ablation/quick.yaml]
        [--rows full inverse_adversary ...] [--steps 10]

Writes ``runs/benchmarks/protector_levers.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from raeg_pl.config import load_grid_config, row_protector_spec
from raeg_pl.data.cache import default_cache_dir, load_split_cached
from raeg_pl.data.datamodule import resolve_data_root
from raeg_pl.lit.protector import ProtectorLitModule
from raeg_pl.stages.check import build_classifier, save_classifier_checkpoint
from raeg_pl.utils.quantize import from_uint8

DEFAULT_ROWS = [
    "full",
    "untargeted_jpeg_keep_classmean_volume",
    "inverse_adversary",
    "inverse_adversary_steps4",
    "inverse_adversary_refit",
]


def build(model_cfg: dict, surrogates: list[str], steps: int) -> ProtectorLitModule:
    """The row's protector module with a stand-in trainer (no Lightning loop around it)."""
    torch.manual_seed(0)
    cfg = {**model_cfg, "warmup_steps": 0, "adv_ramp_steps": 1, "grid_images": 0}
    cfg.pop("surrogate_checkpoints", None)
    model = ProtectorLitModule(surrogates, **cfg)
    model._trainer = SimpleNamespace(global_step=0, world_size=1, estimated_stepping_batches=steps)
    model.log = lambda *a, **k: None
    model.log_dict = lambda *a, **k: None
    return model


def time_row(model: ProtectorLitModule, batches, warmup: int, clip: float | None) -> float:
    """Mean seconds of a training step (step, backward, gradient clipping as the grid's
    Trainer does, Adam) after ``warmup`` steps."""
    opt = model.configure_optimizers()["optimizer"]
    times = []
    for i, (x, y) in enumerate(batches):
        model._trainer.global_step = i
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.training_step((x, y), i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.protector.parameters(), clip)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="experiments/ablation/quick.yaml")
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per row")
    ap.add_argument(
        "--warmup",
        type=int,
        default=18,
        help="untimed steps first (>= 16 fill a 1,000-pair refit buffer at batch 64)",
    )
    ap.add_argument("--out", default="runs/benchmarks/protector_levers.json")
    args = ap.parse_args()
    cfg = load_grid_config(args.config)
    unknown = [r for r in args.rows if r not in cfg["rows"]]
    if unknown:
        raise SystemExit(f"{args.config}: no rows {unknown}; it has {sorted(cfg['rows'])}")
    batch_size = int(cfg["protector"].get("data", {}).get("batch_size", 64))
    split, _, _ = load_split_cached(
        resolve_data_root(None) / cfg["data"]["dataset"] / "train", default_cache_dir(), "RGB"
    )
    n = args.warmup + args.steps
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(split.labels), generator=g)[: n * batch_size].view(n, batch_size)
    batches = [(from_uint8(split.images[i]), split.labels[i]) for i in idx]
    classes = len(split.classes)
    result: dict = {
        "benchmark": "protector training step per ablation row",
        "config": args.config,
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "rows": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        surrogates = []
        for i, s in enumerate(cfg["surrogates"]):
            lit = build_classifier(s["model"], classes, 3)
            surrogates.append(str(save_classifier_checkpoint(lit, Path(tmp) / f"s{i}.ckpt")))
        for row in [*args.rows, args.rows[0]]:
            spec = cfg["rows"][row] or {}
            picked = spec.get("surrogates")
            used = [surrogates[int(i)] for i in picked] if picked is not None else surrogates
            model_cfg = row_protector_spec(cfg, spec).get("model", {})
            model = build(model_cfg, used, n)
            clip = cfg["protector"].get("gradient_clip_val")
            step_s = time_row(model, batches, args.warmup, clip)
            entry = {"step_s": round(step_s, 4), "surrogates": len(used)}
            pirate = model._inverse_adv
            if pirate is not None and pirate.refit_every:
                t0 = time.perf_counter()
                pirate.refit()
                refit_s = time.perf_counter() - t0
                entry["refit_s"] = round(refit_s, 3)
                entry["step_s_with_refit"] = round(step_s + refit_s / pirate.refit_every, 4)
            key = row if row not in result["rows"] else f"{row} (again)"
            result["rows"][key] = entry
            print(key, entry, flush=True)
    base = result["rows"][args.rows[0]]["step_s"]
    again = result["rows"][f"{args.rows[0]} (again)"]["step_s"]
    result["drift"] = round(again / base, 3)
    mean_base = (base + again) / 2
    for entry in result["rows"].values():
        entry["vs_" + args.rows[0]] = round(
            entry.get("step_s_with_refit", entry["step_s"]) / mean_base, 3
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
