"""The image-classification DataModule on the real CIFAR-10 copy and on small real folders."""

from __future__ import annotations

import os
import shutil
import time

import pytest
import torch
from PIL import Image

from raeg_pl.data import DatasetError, ImageClassificationDataModule
from raeg_pl.data.augment import random_crop_flip
from raeg_pl.data.cache import load_split_cached
from raeg_pl.data.datamodule import CIFAR10_CLASSES

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def cifar(data_root, cache_dir):
    dm = ImageClassificationDataModule(
        data_dir=str(data_root), cache_dir=str(cache_dir), download=False
    )
    dm.prepare_data()
    dm.setup()
    return dm


def test_cifar10_counts_per_split_and_class(cifar):
    assert cifar.split_sizes == {"train": 45000, "val": 5000, "test": 10000}
    for ds, per_class in ((cifar.train_set, 4500), (cifar.val_set, 500), (cifar.test_set, 1000)):
        counts = torch.bincount(ds.labels, minlength=10)
        assert counts.tolist() == [per_class] * 10
        assert ds.images.shape[1:] == (3, 32, 32) and ds.images.dtype == torch.uint8


def test_label_order_follows_cifar10(cifar, data_root):
    assert cifar.classes == list(CIFAR10_CLASSES)
    assert cifar.num_classes == 10 and cifar.channels == 3
    # A test image's label must be the index of the folder it came from.
    full, _, _ = load_split_cached(data_root / "cifar10" / "test", cifar.cache_dir, "RGB")
    for i in (0, 1234, 9999):
        assert full.files[i].split(os.sep)[0] == CIFAR10_CLASSES[int(full.labels[i])]
        pixels = torch.from_numpy(
            __import__("numpy").array(
                Image.open(data_root / "cifar10" / "test" / full.files[i]).convert("RGB")
            )
        ).permute(2, 0, 1)
        assert torch.equal(full.images[i], pixels)


def test_train_val_split_is_deterministic_and_disjoint(cifar, data_root, cache_dir):
    again = ImageClassificationDataModule(
        data_dir=str(data_root), cache_dir=str(cache_dir), download=False
    )
    again.setup()
    assert torch.equal(again.val_indices, cifar.val_indices)
    assert not set(cifar.train_indices.tolist()) & set(cifar.val_indices.tolist())
    other = ImageClassificationDataModule(
        data_dir=str(data_root), cache_dir=str(cache_dir), download=False, seed=1
    )
    other.setup()
    assert not torch.equal(other.val_indices, cifar.val_indices)


def test_subset_sizes(data_root, cache_dir):
    dm = ImageClassificationDataModule(
        data_dir=str(data_root),
        cache_dir=str(cache_dir),
        download=False,
        train_per_class=30,
        val_per_class=10,
        test_per_class=20,
    )
    dm.setup()
    assert dm.split_sizes == {"train": 300, "val": 100, "test": 200}
    assert torch.bincount(dm.train_set.labels).tolist() == [30] * 10
    with pytest.raises(ValueError, match="per class"):
        ImageClassificationDataModule(
            data_dir=str(data_root), cache_dir=str(cache_dir), download=False, test_per_class=1001
        ).setup()


def test_cache_is_reused_and_rebuilt_when_the_source_changes(small_folder, tmp_path):
    cache = tmp_path / "cache"
    split = small_folder / "train"
    first, file1, reused1 = load_split_cached(split, cache)
    second, file2, reused2 = load_split_cached(split, cache)
    assert (reused1, reused2) == (False, True) and file1 == file2
    assert torch.equal(first.images, second.images)
    assert not list(small_folder.rglob("*.pt")), "cache must never be written into the data root"
    # Change one image: the fingerprint changes and the cache is rebuilt with the new pixels.
    victim = split / first.files[0]
    Image.new("RGB", (32, 32), (255, 0, 0)).save(victim, quality=95)
    os.utime(victim, ns=(time.time_ns(), time.time_ns() + 10**9))
    third, file3, reused3 = load_split_cached(split, cache)
    assert not reused3 and file3 != file1
    assert third.images[0].float().mean(dim=(1, 2))[0] > 200


def test_corrupt_cache_file_is_rebuilt(small_folder, tmp_path):
    cache = tmp_path / "cache"
    _, path, _ = load_split_cached(small_folder / "test", cache)
    path.write_bytes(b"not a tensor")
    split, _, reused = load_split_cached(small_folder / "test", cache)
    assert not reused and len(split.labels) == 12


def test_imagefolder_dataset_and_loaders(small_folder, tmp_path):
    dm = ImageClassificationDataModule(
        dataset=small_folder.name,
        data_dir=str(small_folder.parent),
        cache_dir=str(tmp_path / "c"),
        val_per_class=2,
        batch_size=8,
        download=False,
    )
    assert dm.classes == ["airplane", "cat", "ship"] and dm.num_classes == 3
    dm.setup()
    assert dm.split_sizes == {"train": 30, "val": 6, "test": 12}
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8 and labels.shape == (8,)
    assert sum(len(b[1]) for b in dm.test_dataloader()) == 12
    # After transfer: float in [0, 1] and unchanged values outside training.
    out, _ = dm.on_after_batch_transfer((images, labels), 0)
    assert out.dtype == torch.float32 and torch.equal(out, images.float() / 255)


def test_grayscale_dataset_keeps_one_channel(small_folder, tmp_path):
    gray = tmp_path / "gray"
    for f in small_folder.rglob("*.jpg"):
        dst = gray / f.relative_to(small_folder)
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.open(f).convert("L").save(dst.with_suffix(".png"))
    dm = ImageClassificationDataModule(
        dataset="gray",
        data_dir=str(tmp_path),
        val_per_class=2,
        cache_dir=str(tmp_path / "c"),
        download=False,
    )
    assert dm.channels == 1
    dm.setup()
    assert dm.train_set.images.shape[1:] == (1, 32, 32)


def test_mixed_sizes_need_image_size(small_folder, tmp_path):
    victim = next((small_folder / "train" / "cat").iterdir())
    Image.open(victim).resize((40, 36)).save(victim)
    with pytest.raises(DatasetError, match=victim.name):
        load_split_cached(small_folder / "train", tmp_path / "c")
    split, _, _ = load_split_cached(small_folder / "train", tmp_path / "c", image_size=(32, 32))
    assert split.images.shape[1:] == (3, 32, 32)


def test_undecodable_file_is_named(small_folder, tmp_path):
    victim = next((small_folder / "train" / "ship").iterdir())
    victim.write_bytes(b"this is not a jpeg")
    with pytest.raises(DatasetError, match=f"{victim.name}.*cannot"):
        load_split_cached(small_folder / "train", tmp_path / "c", mode="RGB")


def test_missing_root_names_every_place_it_looked(tmp_path):
    dm = ImageClassificationDataModule(data_dir=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(DatasetError) as err:
        dm.setup()
    msg = str(err.value)
    for place in ("nowhere/cifar10/train", "nowhere/train", "cifar-10-batches-py", "RAEG_DATA_DIR"):
        assert place in msg


def test_malformed_root_is_a_clear_error(tmp_path):
    (tmp_path / "bad" / "train").mkdir(parents=True)
    (tmp_path / "bad" / "test").mkdir()
    (tmp_path / "bad" / "train" / "readme.txt").write_text("no classes here")
    dm = ImageClassificationDataModule(dataset="bad", data_dir=str(tmp_path), download=False)
    with pytest.raises(DatasetError, match="no class sub-folders"):
        dm.setup()


def test_data_root_from_environment(monkeypatch, small_folder, tmp_path):
    monkeypatch.setenv("RAEG_DATA_DIR", str(small_folder.parent))
    dm = ImageClassificationDataModule(
        dataset=small_folder.name, val_per_class=2, cache_dir=str(tmp_path / "c"), download=False
    )
    assert dm.root == small_folder.parent and dm.num_classes == 3


def test_torchvision_cifar_format_is_accepted(tmp_path):
    import pickle

    import numpy as np

    base = tmp_path / "cifar10" / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 20) for i in range(1, 6)] + [("test_batch", 20)]:
        with open(base / name, "wb") as f:
            pickle.dump(
                {
                    "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                    "labels": [i % 10 for i in range(n)],
                },
                f,
            )
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES)}, f)
    dm = ImageClassificationDataModule(data_dir=str(tmp_path), val_per_class=2, download=False)
    dm.setup()
    assert dm.split_sizes == {"train": 80, "val": 20, "test": 20}
    shutil.rmtree(base)


def test_augmentation_crops_and_flips_per_image():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    assert torch.equal(random_crop_flip(x, padding=0, flip=False), x)
    g = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, padding=2, flip=True, generator=g)
    assert out.shape == x.shape
    # Each output must be a (possibly flipped) window of its own reflect-padded input.
    padded = torch.nn.functional.pad(x, (2,) * 4, mode="reflect")
    for b in range(2):
        found = any(
            torch.equal(out[b], cand) or torch.equal(out[b].flip(-1), cand)
            for dy in range(5)
            for dx in range(5)
            for cand in [padded[b, :, dy : dy + 8, dx : dx + 8]]
        )
        assert found
    # Over many draws both flips and several offsets occur.
    many = random_crop_flip(x[:1].expand(64, -1, -1, -1), padding=2, flip=True)
    assert len({tuple(m.flatten()[:5].tolist()) for m in many}) > 5


def test_train_defense_is_applied_to_training_and_validation_images_only(small_folder, tmp_path):
    common = {
        "dataset": small_folder.name,
        "data_dir": str(small_folder.parent),
        "cache_dir": str(tmp_path / "c"),
        "val_per_class": 2,
        "download": False,
    }
    plain = ImageClassificationDataModule(**common)
    gray = ImageClassificationDataModule(**common, train_defense="gray")
    jpeg = ImageClassificationDataModule(**common, train_defense="jpeg:q=10")
    for dm in (plain, gray, jpeg):
        dm.setup()
    for split in ("train_set", "val_set"):
        g = getattr(gray, split).images
        assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])
        assert not torch.equal(getattr(plain, split).images, g)
        diff = getattr(jpeg, split).images.float() - getattr(plain, split).images.float()
        assert diff.abs().mean() > 2  # quality 10 visibly changes the pixels
    assert torch.equal(gray.test_set.images, plain.test_set.images)  # the test set stays clean
