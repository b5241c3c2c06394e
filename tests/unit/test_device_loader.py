"""The on-device batch path of the DataModule (``on_device=True``) on real CIFAR-10."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from raeg_pl.data import ImageClassificationDataModule
from raeg_pl.data.augment import random_crop_flip
from raeg_pl.data.datamodule import DeviceBatches, DeviceBatchSampler
from raeg_pl.lit.classifier import ClassifierLitModule

pytestmark = pytest.mark.data

N_TRAIN = 500  # 50 real training images per class


def _datamodule(data_root, cache_dir, on_device: bool, **kw) -> ImageClassificationDataModule:
    args = {
        "data_dir": str(data_root),
        "cache_dir": str(cache_dir),
        "download": False,
        "train_per_class": N_TRAIN // 10,
        "val_per_class": 10,
        "test_per_class": 10,
        "batch_size": 64,
        "seed": 3,
        "on_device": on_device,
    }
    return ImageClassificationDataModule(**(args | kw))


@pytest.fixture(scope="module")
def small(data_root, cache_dir) -> ImageClassificationDataModule:
    dm = _datamodule(data_root, cache_dir, on_device=True)
    dm.setup()
    return dm


def _epoch_indices(sampler: DeviceBatchSampler, epoch: int) -> list[torch.Tensor]:
    sampler.set_epoch(epoch)
    return sampler.batches()


def test_loader_kind_and_length_follow_on_device(small, data_root, cache_dir):
    loader = small.train_dataloader()
    assert isinstance(loader, DeviceBatches)
    assert len(loader) == N_TRAIN // 64  # the ragged last batch is dropped, as before
    assert len(small.val_dataloader()) == 1 and len(small.test_dataloader()) == 1
    plain = _datamodule(data_root, cache_dir, on_device=False)
    plain.setup()
    assert isinstance(plain.train_dataloader(), DataLoader)
    assert len(plain.train_dataloader()) == len(loader)


def test_every_training_index_once_per_epoch(small):
    ds = small.train_set
    sampler = DeviceBatchSampler(len(ds), 64, shuffle=True, drop_last=False, seed=3)
    loader = DeviceBatches(ds, sampler)
    assert len(loader) == -(-N_TRAIN // 64)
    for epoch in (0, 1):
        expected = _epoch_indices(DeviceBatchSampler(len(ds), 64, True, False, seed=3), epoch)
        sampler.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(loader) == len(expected)
        order = torch.cat(expected)
        assert torch.equal(order.sort().values, torch.arange(N_TRAIN))
        # The yielded real images and labels are exactly those of the drawn indices.
        assert torch.equal(torch.cat([b[0] for b in batches]), ds.images[order])
        assert torch.equal(torch.cat([b[1] for b in batches]), ds.labels[order])
        assert batches[0][0].dtype == torch.uint8 and batches[-1][0].shape[0] == N_TRAIN % 64
    dropped = DeviceBatchSampler(len(ds), 64, shuffle=True, drop_last=True, seed=3)
    full = dropped.batches()
    assert len(full) == len(dropped) == N_TRAIN // 64
    assert all(len(b) == 64 for b in full) and len(set(torch.cat(full).tolist())) == 448


def test_epochs_differ_and_the_seed_reproduces_them(small):
    n = len(small.train_set)
    a = DeviceBatchSampler(n, 64, shuffle=True, drop_last=False, seed=3)
    e0, e1 = torch.cat(a.batches()), torch.cat(a.batches())  # passes advance the epoch
    assert not torch.equal(e0, e1)
    b = DeviceBatchSampler(n, 64, shuffle=True, drop_last=False, seed=3)
    assert torch.equal(torch.cat(_epoch_indices(b, 0)), e0)
    assert torch.equal(torch.cat(_epoch_indices(b, 1)), e1)
    other = DeviceBatchSampler(n, 64, shuffle=True, drop_last=False, seed=4)
    assert not torch.equal(torch.cat(_epoch_indices(other, 0)), e0)
    fixed = DeviceBatchSampler(n, 64, shuffle=False, drop_last=False, seed=3)
    assert torch.equal(torch.cat(_epoch_indices(fixed, 5)), torch.arange(n))


@pytest.mark.parametrize(
    ("n", "drop_last"), [(N_TRAIN, False), (N_TRAIN - 1, False), (N_TRAIN, True)]
)
def test_two_rank_shards_are_disjoint_and_cover_the_epoch(n, drop_last):
    ranks = [
        DeviceBatchSampler(n, 32, True, drop_last, seed=3, rank=r, world_size=2) for r in (0, 1)
    ]
    single = DeviceBatchSampler(n, 64, True, drop_last, seed=3)
    for epoch in (0, 1):
        shards = [_epoch_indices(s, epoch) for s in ranks]
        assert len(shards[0]) == len(shards[1]) == len(ranks[0]) == len(ranks[1])
        assert [len(b) for b in shards[0]] == [len(b) for b in shards[1]]
        r0, r1 = (set(torch.cat(s).tolist()) for s in shards)
        seen = torch.cat([torch.cat(s) for s in shards])
        if drop_last:
            assert not r0 & r1 and len(seen) == (n // 64) * 64 == len(seen.unique())
            # Rank slices of each global batch are exactly the single-process batches.
            whole = _epoch_indices(single, epoch)
            assert all(
                torch.equal(torch.cat([s0, s1]), w)
                for s0, s1, w in zip(shards[0], shards[1], whole, strict=True)
            )
        else:
            assert r0 | r1 == set(range(n))
            # Only the wrap-around that evens out an odd split repeats an index.
            assert len(seen) == n + n % 2 and len(r0 & r1) == n % 2


def test_lightning_fit_on_device_matches_dataloader_steps(data_root, cache_dir, tmp_path):
    class Record(L.Callback):
        def __init__(self) -> None:
            self.batches: list[tuple[int, torch.Tensor, torch.Tensor]] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.batches.append((trainer.current_epoch, batch[0].detach(), batch[1]))

    # One epoch through the DataLoader, two on the device (the second checks set_epoch).
    steps, records = {}, {}
    for on_device, epochs in ((False, 1), (True, 2)):
        L.seed_everything(0)
        dm = _datamodule(data_root, cache_dir, on_device)
        record = Record()
        trainer = L.Trainer(
            accelerator="cpu",
            max_epochs=epochs,
            limit_val_batches=1.0 if on_device else 0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[record],
            default_root_dir=str(tmp_path / str(on_device)),
        )
        module = ClassifierLitModule(arch="resnet_tiny_cifar", num_classes=10, lr=0.05)
        trainer.fit(module, datamodule=dm)
        steps[on_device], records[on_device] = trainer.global_step, record.batches
    assert "val/acc" in trainer.callback_metrics  # validation ran on DeviceBatches too
    assert steps[False] == N_TRAIN // 64 and steps[True] == 2 * steps[False]
    # Lightning set each epoch on the sampler: every batch is the seeded epoch order's, and
    # it reached the module converted and augmented: float (64, 3, 32, 32) in [0, 1].
    ds = dm.train_set
    for epoch in (0, 1):
        idx = _epoch_indices(DeviceBatchSampler(N_TRAIN, 64, True, True, seed=3), epoch)
        got = [(x, y) for e, x, y in records[True] if e == epoch]
        assert len(got) == len(idx)
        for (images, labels), i in zip(got, idx, strict=True):
            assert torch.equal(labels, ds.labels[i])
            assert images.shape == (64, 3, 32, 32) and images.dtype == torch.float32
            assert images.min() >= 0 and images.max() <= 1
            changed = (images != ds.images[i].float() / 255).flatten(1).any(1)
            assert changed.float().mean() > 0.5


def test_batched_augmentation_on_real_uint8_images(small):
    images = small.train_set.images[:128]
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(images, padding=4, flip=True, generator=g).float() / 255
    assert out.shape == (128, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    # Same draws as cropping a reflect-padded float copy and flipping: one gather does both.
    g = torch.Generator().manual_seed(0)
    dx = torch.randint(0, 9, (128,), generator=g)
    dy = torch.randint(0, 9, (128,), generator=g)
    flips = torch.rand(128, generator=g) < 0.5
    padded = F.pad(images.float() / 255, (4,) * 4, mode="reflect")
    for b in range(128):
        window = padded[b, :, dy[b] : dy[b] + 32, dx[b] : dx[b] + 32]
        assert torch.equal(out[b], window.flip(-1) if flips[b] else window)
    moved = (out != images.float() / 255).flatten(1).any(1)
    assert moved.float().mean() > 0.8
    # The DataModule augments its training batches the same way, whichever the dtype.
    assert torch.equal(
        random_crop_flip(images.float() / 255, 4, True, torch.Generator().manual_seed(1)),
        random_crop_flip(images, 4, True, torch.Generator().manual_seed(1)).float() / 255,
    )
