"""The protector workflow under CPU DDP (2 gloo processes): training, metrics and export.

Run as a script (``python test_ddp_protector.py CONFIG.json``) this file is also the
training program of the DDP test: Lightning's DDP launcher starts the second rank by running
the same command again.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raeg_pl.io import protected
from raeg_pl.io.protected import MANIFEST, load_export, verify_folder, write_image_folder
from raeg_pl.models.protector import InvertibleProtector

# Lightning, the data module and the metrics are imported where they are used: the export
# workers re-import this module in every spawned process, and need none of them.

REPO = Path(__file__).resolve().parents[2]
PRESET = REPO / "experiments" / "_base" / "ddp_protector.yaml"

GLOBAL_BATCH = 32
TRAIN_PER_CLASS = 16  # 160 images: 5 global batches per epoch
EPOCHS = 6
MODEL = {
    "levels": 2,
    "blocks_per_level": 2,
    "hidden_channels": 16,
    "lr": 3e-4,
    "adv_mode": "targeted",
    "l_adv": 0.1,
    "psnr_target": None,
    "warmup_steps": 0,
    "adv_ramp_steps": 10,
    "train_defenses": [],
    "eval_defenses": ["none"],
    "grid_images": 0,
}
VAL_KEYS = (
    "val/psnr_protected",
    "val/psnr_recovered",
    "val/ssim_protected",
    "val/surrogate_acc_clean",
    "val/surrogate_acc_protected/none",
    "val/target_hit_rate",
)


def _data_cfg(data_root, cache_dir) -> dict:
    return {
        "data_dir": str(data_root),
        "cache_dir": str(cache_dir),
        "download": False,
        "train_per_class": TRAIN_PER_CLASS,
        "val_per_class": 10,
        "test_per_class": 10,
        "batch_size": GLOBAL_BATCH,
        "augment": False,
    }


TRACE_STEPS = (0, 1, 2, 5, 10, 20, 30)


# ------------------------------------------------------------------ the training program
def _digest(image: torch.Tensor) -> str:
    """Short content hash of one image tensor: identifies a training sample in a batch."""
    return hashlib.sha256(image.numpy().tobytes()).hexdigest()[:16]


def _fit(cfg: dict) -> None:
    """Fits a protector with ``cfg["trainer"]`` and records what each rank did."""
    import lightning as L

    from raeg_pl.data import ImageClassificationDataModule
    from raeg_pl.lit.protector import ProtectorLitModule
    from raeg_pl.utils.run import to_float_dict

    class Record(L.Callback):
        """The images of each of this rank's batches, and the weights after some steps."""

        def __init__(self) -> None:
            self.batches: list[list[str]] = []
            self.weights: dict[int, torch.Tensor] = {}

        def _snapshot(self, trainer, pl_module) -> None:
            if trainer.global_step in TRACE_STEPS:
                params = [p.detach().flatten() for p in pl_module.protector.parameters()]
                self.weights[trainer.global_step] = torch.cat(params).clone()

        def on_train_start(self, trainer, pl_module) -> None:
            self._snapshot(trainer, pl_module)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
            images = batch[0].detach().cpu().contiguous()
            self.batches.append(sorted(_digest(x) for x in images))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
            self._snapshot(trainer, pl_module)  # global_step counts the step just taken

    out = Path(cfg["out"])
    L.seed_everything(0, workers=True)
    dm = ImageClassificationDataModule(**cfg["data"])
    model = ProtectorLitModule([cfg["surrogate"]], **MODEL)
    record = Record()
    trainer = L.Trainer(
        **{
            "max_epochs": EPOCHS,
            "check_val_every_n_epoch": EPOCHS,  # validate once, on the final weights
            "num_sanity_val_steps": 0,
            "gradient_clip_val": 1.0,
            "logger": False,
            "callbacks": [record],
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(out),
            **cfg["trainer"],
        }
    )
    trainer.fit(model, datamodule=dm)
    local = {
        "batches": record.batches,
        "batch_size": trainer.train_dataloader.batch_size,
        "fingerprint": model.protector.fingerprint(),
    }
    ranks = [local]
    if dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, local)
    if trainer.is_global_zero:
        torch.save(model.protector.state_dict(), out / "protector.pt")
        torch.save(record.weights, out / "trace.pt")
        result = {
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "metrics": to_float_dict(trainer.callback_metrics),
            "ranks": ranks,
        }
        (out / "result.json").write_text(json.dumps(result, indent=1))


def _stage_trainer(devices: int) -> dict:
    """Trainer settings of the protector stage with the DDP preset, on CPU processes."""
    from raeg_pl.pipeline import load_pipeline_config

    trainer = load_pipeline_config(PRESET)["protector"]["trainer"]
    assert trainer["strategy"] == "ddp", trainer
    # float32: the runs then differ only by the order of float reductions.
    return {**trainer, "accelerator": "cpu", "devices": devices, "precision": "32-true"}


def _run_fit(tmp_path: Path, name: str, surrogate: Path, data: dict, devices: int) -> dict:
    out = tmp_path / name
    out.mkdir()
    cfg = {
        "out": str(out),
        "surrogate": str(surrogate),
        "data": data,
        "trainer": _stage_trainer(devices),
    }
    (out / "config.json").write_text(json.dumps(cfg))
    # One thread per process for both runs: 2 processes on 2 cores, and OpenMP teams on
    # cores shared with other work are many times slower than one thread.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(out / "config.json")],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def one_thread():
    """This process on one thread, like each training process (see ``_run_fit``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def surrogate(data_root, cache_dir, tmp_path_factory, one_thread) -> Path:
    """A small real surrogate: a ClassifierLitModule trained 2 epochs on 1,000 images."""
    from raeg_pl.pipeline import train_classifier

    stage = tmp_path_factory.mktemp("surrogate")
    train_classifier(
        stage,
        {"arch": "resnet_tiny_cifar", "lr": 0.2},
        {**_data_cfg(data_root, cache_dir), "train_per_class": 100, "batch_size": 128},
        {"accelerator": "cpu", "precision": "bf16-mixed", "enable_progress_bar": False},
        2,
        seed=0,
    )
    return stage / "checkpoints" / "last.ckpt"


def _validate(weights: Path, surrogate: Path, loader=None, datamodule=None) -> dict:
    """Validation metrics of saved protector weights, computed by this one process."""
    import lightning as L

    from raeg_pl.lit.protector import ProtectorLitModule

    model = ProtectorLitModule([str(surrogate)], **MODEL)
    model.protector.load_state_dict(torch.load(weights, map_location="cpu"))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return trainer.validate(model, dataloaders=loader, datamodule=datamodule, verbose=False)[0]


@pytest.mark.data
@pytest.mark.slow
def test_ddp_protector_fit_matches_one_process(
    data_root, cache_dir, surrogate, one_thread, tmp_path
):
    from torch.utils.data import DataLoader, TensorDataset

    from raeg_pl.data import ImageClassificationDataModule

    data = _data_cfg(data_root, cache_dir)
    # The one-process reference runs the same preset with a world of one, so that the same
    # DistributedSampler deals the same shuffled order to both runs.
    one = _run_fit(tmp_path, "one", surrogate, data, devices=1)
    two = _run_fit(tmp_path, "two", surrogate, data, devices=2)

    # The global batch is split over the ranks: the same optimiser steps on the same images.
    steps = EPOCHS * (10 * TRAIN_PER_CLASS // GLOBAL_BATCH)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["global_step"] == two["global_step"] == steps
    assert [r["batch_size"] for r in one["ranks"]] == [GLOBAL_BATCH]
    assert [r["batch_size"] for r in two["ranks"]] == [GLOBAL_BATCH // 2] * 2
    (ref,), (rank0, rank1) = (
        [r["batches"] for r in one["ranks"]],
        [r["batches"] for r in two["ranks"]],
    )
    assert len(ref) == len(rank0) == len(rank1) == steps
    for step in range(steps):
        assert len(rank0[step]) == len(rank1[step]) == GLOBAL_BATCH // 2
        assert sorted(rank0[step] + rank1[step]) == ref[step], step
    # Gradients are all-reduced: both ranks end with bit-identical weights.
    assert two["ranks"][0]["fingerprint"] == two["ranks"][1]["fingerprint"]

    # Same images, same steps: the weights differ only by float rounding (sums over the batch
    # in another order), which the adversarial training then amplifies. Measured on 2 cores:
    # the first update agrees to <0.2% of its size (cancelling sums of near-zero gradients
    # set that scale); after 30 steps the weights are 10-30% of their movement apart and the
    # validation figures 0.1-0.3 dB and 1-3 images, as far as a one-process run drifts on 2
    # threads instead of 1 (SSIM up to 0.011 apart with one thread per process). The
    # tolerances leave 2-5x room over those gaps.
    w1, w2 = (torch.load(tmp_path / n / "trace.pt") for n in ("one", "two"))
    assert torch.equal(w1[0], w2[0])
    first_update = (w1[1] - w1[0]).abs().max()
    assert first_update > 1e-4, first_update
    assert (w2[1] - w1[1]).abs().max() < 1e-2 * first_update, (w2[1] - w1[1]).abs().max()
    m1, m2 = one["metrics"], two["metrics"]
    assert 20 < m1["val/psnr_protected"] < 45, m1  # it really moved away from the identity
    tolerance = {
        "val/psnr_protected": 0.5,
        "val/psnr_recovered": 1.0,
        "val/ssim_protected": 0.025,
        "val/surrogate_acc_clean": 0.0,  # the surrogate is frozen
        "val/surrogate_acc_protected/none": 0.06,
        "val/target_hit_rate": 0.06,
    }
    for key, tol in tolerance.items():
        assert abs(m2[key] - m1[key]) <= tol, (key, m1[key], m2[key])

    # Metric synchronisation: the DDP figures are those of all 100 validation images, which
    # one process computes from the same (DDP-trained) weights...
    weights = tmp_path / "two" / "protector.pt"
    full = _validate(weights, surrogate, datamodule=ImageClassificationDataModule(**data))
    for key in VAL_KEYS:
        assert m2[key] == pytest.approx(full[key], abs=1e-4), (key, m2[key], full[key])
    # ...and not those of either rank's half alone, which differ by far more than that.
    dm = ImageClassificationDataModule(**data)
    dm.setup()
    val = dm.val_set
    halves = []
    for r in range(2):
        ds = TensorDataset(val.images[r::2].float() / 255, val.labels[r::2])
        halves.append(_validate(weights, surrogate, loader=DataLoader(ds, batch_size=50)))
    gaps = [
        max(abs(h[k] - full[k]) for h in halves)
        for k in ("val/psnr_protected", "val/psnr_recovered")
    ]
    assert max(gaps) > 1e-2, (gaps, halves, full)


# ------------------------------------------------------------------------------- export
def _perturbed_protector() -> InvertibleProtector:
    """A small protector moved away from the identity by seeded noise on every weight."""
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the hidden layers' initialisation; equal on every rank
        net = InvertibleProtector(3, levels=2, blocks_per_level=2, hidden_channels=16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    return net.eval()


def _export_worker(rank: int, world: int, init: str, out: str, data: dict) -> None:
    """One rank of the distributed export: two good exports, then two that must fail."""
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    torch.set_num_threads(1)
    # Every file this rank writes, in order (the module's writers, wrapped in this process).
    writes: list[str] = []
    real_write, real_text = protected.write_atomic, protected.write_atomic_text

    def write_atomic(path, payload, **kwargs):
        writes.append(str(path))
        real_write(path, payload, **kwargs)

    def write_atomic_text(path, text):
        writes.append(str(path))
        real_text(path, text)

    protected.write_atomic, protected.write_atomic_text = write_atomic, write_atomic_text
    net = _perturbed_protector()
    common = {
        "labels": data["labels"],
        "classes": data["classes"],
        "batch_size": 64,
        "extra": {"protector_fingerprint": net.fingerprint()},
    }
    report: dict = {}
    try:
        # Rank and world size come from the process group.
        write_image_folder(
            Path(out) / "clean", data["images"], files=data["files"], kind="clean", **common
        )
        write_image_folder(
            Path(out) / "protected",
            data["images"],
            files=data["files"],
            kind="protected",
            transform=net,
            **common,
        )
        report["writes"] = list(writes)
        # Rank 1 was handed a different file order: every rank refuses, nothing is written.
        files = data["files"] if rank == 0 else data["files"][::-1]
        try:
            write_image_folder(
                Path(out) / "mismatch", data["images"], files=files, kind="clean", **common
            )
        except ValueError as e:
            report["mismatch"] = str(e)

        # Rank 1 fails while writing: every rank raises, and no manifest marks it complete.
        def failing(x: torch.Tensor) -> torch.Tensor:
            if rank == 1:
                raise OSError("no space left on device")
            return net(x)

        try:
            write_image_folder(
                Path(out) / "failed",
                data["images"],
                files=data["files"],
                kind="protected",
                transform=failing,
                **common,
            )
        except RuntimeError as e:
            report["failed"] = str(e)
    finally:
        (Path(out) / f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()


def _tree(folder: Path) -> list[str]:
    """Every file under a folder, hidden ones included, as sorted relative paths."""
    return sorted(
        str(Path(root, f).relative_to(folder)) for root, _, names in os.walk(folder) for f in names
    )


@pytest.mark.data
@pytest.mark.slow
def test_distributed_export_writes_each_file_once_and_matches_one_process(
    data_root, cache_dir, tmp_path
):
    from raeg_pl.data import ImageClassificationDataModule
    from raeg_pl.metrics import psnr_db

    dm = ImageClassificationDataModule(**{**_data_cfg(data_root, cache_dir), "train_per_class": 30})
    dm.setup()
    data = {
        "images": dm.train_set.images,
        "labels": dm.train_set.labels,
        "files": dm.train_files,
        "classes": dm.classes,
    }
    n = len(data["files"])
    assert n == 300
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    ddp.mkdir()
    init = f"file://{tmp_path / 'pg_init'}"
    mp.spawn(_export_worker, args=(2, init, str(ddp), data), nprocs=2, join=True)
    reports = [json.loads((ddp / f"rank{r}.json").read_text()) for r in range(2)]

    net = _perturbed_protector()
    extra = {"protector_fingerprint": net.fingerprint()}
    for kind, transform in (("clean", None), ("protected", net)):
        write_image_folder(
            single / kind,
            data["images"],
            data["labels"],
            data["classes"],
            data["files"],
            kind=kind,
            transform=transform,
            batch_size=64,
            extra=extra,
        )

    # Every file was written exactly once, by one rank; the manifest once, by rank 0, last.
    for kind in ("clean", "protected"):
        per_rank = [[w for w in rep["writes"] if f"/{kind}/" in w] for rep in reports]
        counts = Counter(w for writes in per_rank for w in writes)
        assert len(counts) == n + 1 and set(counts.values()) == {1}
        manifest_path = str(ddp / kind / MANIFEST)
        assert per_rank[0][-1] == manifest_path and manifest_path not in per_rank[1]
        # Batches 0, 2, 4 of 64 images on rank 0; 1 and 3 on rank 1.
        assert [len(w) for w in per_rank] == [64 + 64 + 44 + 1, 128]

    for kind in ("clean", "protected"):
        tree = _tree(ddp / kind)
        # No temporary file or any other leftover: the PNGs and the manifest, nothing else.
        assert len(tree) == n + 1 and tree == _tree(single / kind)
        assert not [f for f in tree if Path(f).name.startswith(".") or f.endswith(".tmp")]
        for rel in tree:
            assert (ddp / kind / rel).read_bytes() == (single / kind / rel).read_bytes(), rel
        assert verify_folder(ddp / kind) == {"missing": [], "modified": [], "extra": []}
    manifest = json.loads((ddp / "protected" / MANIFEST).read_text())
    assert manifest["num_images"] == n and manifest["kind"] == "protected"

    # The protected export is really transformed (not a copy) and reads back as written.
    clean, labels, _, rels, clean_manifest = load_export(ddp / "clean")
    prot, prot_labels, _, prot_rels, _ = load_export(ddp / "protected")
    assert rels == prot_rels and torch.equal(labels, prot_labels)
    psnr = psnr_db(prot, clean)
    assert (psnr < 60).all() and psnr.mean() > 25, psnr.mean()
    order = [data["files"].index(clean_manifest["files"][r]["source"]) for r in rels]
    assert torch.equal(clean, data["images"][order])

    # Failures are collective: both ranks raise, nothing is marked complete.
    for rep in reports:
        assert "different" in rep["mismatch"], rep
        assert "rank 1: OSError: no space left on device" in rep["failed"], rep
    assert not (ddp / "mismatch").exists()
    assert not (ddp / "failed" / MANIFEST).exists()


def test_export_refuses_clashing_paths_and_a_world_without_process_group(tmp_path):
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    labels = torch.tensor([0, 0])
    # Two sources, one output file: one image would silently replace the other.
    with pytest.raises(ValueError, match="cat/a.jpg and cat/a.png"):
        write_image_folder(
            tmp_path / "x", images, labels, ["cat"], ["cat/a.jpg", "cat/a.png"], "clean"
        )
    assert not (tmp_path / "x").exists()
    files = ["cat/a.jpg", "cat/b.jpg"]
    with pytest.raises(RuntimeError, match="process group"):
        write_image_folder(tmp_path / "y", images, labels, ["cat"], files, "clean", world_size=2)
    with pytest.raises(ValueError, match="rank 2"):
        write_image_folder(
            tmp_path / "y", images, labels, ["cat"], files, "clean", rank=2, world_size=2
        )
    assert not (tmp_path / "y").exists()
    # Without a process group (or with world_size=1) one process writes it all.
    manifest = write_image_folder(tmp_path / "z", images, labels, ["cat"], files, "clean")
    assert sorted(manifest["files"]) == ["train/cat/a.png", "train/cat/b.png"]


if __name__ == "__main__":
    _fit(json.loads(Path(sys.argv[1]).read_text()))
