"""Image-classification DataModule over CIFAR-10 or any ImageFolder dataset.

Images are decoded once into uint8 tensors (see :mod:`raeg_pl.data.cache`) and served in
batches straight from memory; conversion to float and augmentation happen on the batch,
on the training device, after transfer. With ``on_device=True`` the whole split is copied to
the training device once and batches are gathered there (:class:`DeviceBatches`), with no
DataLoader at all.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from raeg_pl.data.augment import random_crop_flip
from raeg_pl.data.cache import (
    DatasetError,
    DecodedSplit,
    default_cache_dir,
    detect_mode,
    list_image_folder,
    load_split_cached,
)
from raeg_pl.utils.quantize import to_uint8

DATA_DIR_ENV = "RAEG_DATA_DIR"
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def resolve_data_root(data_dir: str | os.PathLike | None) -> Path:
    """The data root: ``data_dir`` if given, else ``$RAEG_DATA_DIR``, else ``./data``."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    return Path("data")


class TensorImageDataset(Dataset):
    """Images and labels held as tensors, fetched a whole batch at a time.

    Args:
        images: (N, C, H, W) uint8.
        labels: (N,) int64.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self._device_copy: tuple[torch.device, torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # One gather per batch instead of one Python call and a stack per image.
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.images[idx], self.labels[idx]

    def on(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Images and labels on ``device``, copied once and reused by every later call.

        Only the latest device's copy is kept, so a reloaded loader does not copy again.
        """
        device = torch.device(device)
        if self._device_copy is None or self._device_copy[0] != device:
            self._device_copy = (device, self.images.to(device), self.labels.to(device))
        return self._device_copy[1], self._device_copy[2]


def _collate_batch(batch):
    return batch


def _epoch_seed(seed: int, epoch: int) -> int:
    # Far-apart streams per seed, so runs with neighbouring seeds never share an epoch order.
    return (seed * 1_000_003 + epoch) % (2**63)


class DeviceBatchSampler:
    """Per-rank index batches over a seeded per-epoch permutation, generated on a device.

    Each epoch's order is ``randperm(num_samples)`` from a generator seeded with
    ``(seed, epoch)`` on the device that holds the data (identity order without shuffling):
    identical on every rank, different from epoch to epoch, reproducible from the seed (the
    permutation of a CUDA generator differs from a CPU one's). The order is cut into global
    batches of ``batch_size * world_size`` indices and rank ``r`` takes the ``r``-th
    equal slice of each, so the ranks' shards are disjoint and together form exactly the
    batches a single process would see.

    With ``drop_last`` only whole global batches are used. Without it every index is used:
    the order is first extended by wrapping around to a multiple of ``world_size`` (at most
    ``world_size - 1`` repeats, as ``DistributedSampler`` pads), and the last, shorter global
    batch is split equally. Every rank thus gets the same number of batches.

    Args:
        num_samples: size of the split.
        batch_size: per-rank batch size.
        shuffle: a new random order every epoch; else the identity order.
        drop_last: drop the ragged last global batch.
        seed: seed of the per-epoch permutations.
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of processes sharing each global batch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch of the next pass (Lightning calls it at every epoch start)."""
        self.epoch = epoch

    @property
    def _global_batch(self) -> int:
        return self.batch_size * self.world_size

    @property
    def _padded_len(self) -> int:
        # Without drop_last the order is wrapped to a multiple of world_size.
        return -(-self.num_samples // self.world_size) * self.world_size

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self._global_batch
        return -(-self._padded_len // self._global_batch)

    def order(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The epoch's full order of indices (num_samples,) int64 on ``device``."""
        device = torch.device(device)
        if not self.shuffle:
            return torch.arange(self.num_samples, device=device)
        g = torch.Generator(device=device)
        g.manual_seed(_epoch_seed(self.seed, self.epoch))
        return torch.randperm(self.num_samples, generator=g, device=device)

    def batches(self, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """This rank's index batches for the current epoch, then advances the epoch by one.

        The advance makes repeated passes without ``set_epoch`` (a plain training loop) see
        a new order each time; Lightning's ``set_epoch`` before each pass takes precedence.

        Returns:
            ``len(self)`` index tensors (b,) int64 on ``device``, b = batch_size except
            possibly the last one.
        """
        order = self.order(device)
        self.epoch += 1
        n_batches = len(self)
        if n_batches == 0:
            return []
        if self.drop_last:
            used = n_batches * self._global_batch
        else:
            used = self._padded_len
            if used > self.num_samples:
                wrap = torch.arange(used, device=order.device) % self.num_samples
                order = order[wrap]
        out = []
        for start in range(0, used, self._global_batch):
            size = min(self._global_batch, used - start) // self.world_size
            first = start + self.rank * size
            out.append(order[first : first + size])
        return out


class DeviceBatches:
    """Batches of a tensor dataset gathered on the training device, with no DataLoader.

    On first iteration the split's uint8 images and labels are copied to ``device`` once (see
    :meth:`TensorImageDataset.on`); every batch is then one indexing of those tensors by the
    sampler's on-device indices. Lightning treats it as any iterable with a length: it
    calls ``sampler.set_epoch`` at every epoch start and runs ``on_after_batch_transfer``
    (float conversion, augmentation) on each batch.

    Yields:
        ``(images, labels)``: images (b, C, H, W) uint8 in [0, 255], labels (b,) int64, both
        on ``device``.

    Args:
        dataset: the split, held on the CPU.
        sampler: which indices each batch of this rank takes.
        device: where the data lives and the batches are made.
    """

    # Lightning inspects ``batch_sampler`` next to ``sampler`` on every loader it is given.
    batch_sampler = None

    def __init__(
        self,
        dataset: TensorImageDataset,
        sampler: DeviceBatchSampler,
        device: torch.device | str = "cpu",
    ) -> None:
        if sampler.num_samples != len(dataset):
            raise ValueError(
                f"sampler over {sampler.num_samples} items, dataset has {len(dataset)}"
            )
        self.dataset = dataset
        self.sampler = sampler
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.dataset.on(self.device)
        for idx in self.sampler.batches(self.device):
            yield images[idx], labels[idx]


@dataclass
class _Located:
    train: Path | None
    test: Path | None
    torchvision_root: Path | None


def read_cifar10_batches(folder: Path, train: bool) -> DecodedSplit:
    """Reads torchvision's ``cifar-10-batches-py`` pickles (the format of the official archive)."""
    import pickle

    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    data, labels = [], []
    for name in names:
        path = folder / name
        try:
            with open(path, "rb") as f:
                blob = pickle.load(f, encoding="latin1")
            data.append(torch.as_tensor(blob["data"], dtype=torch.uint8).view(-1, 3, 32, 32))
            labels += list(blob.get("labels", blob.get("fine_labels", [])))
        except (OSError, pickle.UnpicklingError, KeyError, EOFError) as e:
            raise DatasetError(f"{path}: not a readable CIFAR-10 batch ({e})") from e
    images = torch.cat(data).contiguous()
    return DecodedSplit(
        images,
        torch.tensor(labels, dtype=torch.int64),
        list(CIFAR10_CLASSES),
        [f"{i:05d}" for i in range(len(labels))],
    )


def apply_defense_uint8(images: torch.Tensor, spec: str, batch_size: int = 1024) -> torch.Tensor:
    """Applies a defence's real 8-bit form to uint8 images (N, C, H, W), batch by batch."""
    from raeg_pl.defenses import get_defense

    defense = get_defense(spec)
    out = torch.empty_like(images)
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].float() / 255
        out[i : i + batch_size] = to_uint8(defense.real(x))
    return out


def stratified_split(
    labels: torch.Tensor, num_classes: int, val_per_class: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic per-class split of indices into (train, val).

    Each class contributes ``val_per_class`` randomly chosen images to val (seeded), the rest
    to train. Both index tensors are sorted.
    """
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c).flatten()
        perm = idx[torch.randperm(len(idx), generator=g)]
        if val_per_class > len(perm):
            raise ValueError(f"class {c}: val_per_class={val_per_class} > {len(perm)} images")
        val_idx.append(perm[:val_per_class])
        train_idx.append(perm[val_per_class:])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values


def per_class_subset(
    labels: torch.Tensor, indices: torch.Tensor, per_class: int | None, num_classes: int, seed: int
) -> torch.Tensor:
    """The first ``per_class`` indices of each class after a seeded shuffle (all if None)."""
    if per_class is None:
        return indices
    g = torch.Generator().manual_seed(seed + 7919)
    out = []
    for c in range(num_classes):
        idx = indices[labels[indices] == c]
        if per_class > len(idx):
            raise ValueError(f"class {c}: asked for {per_class} images per class, only {len(idx)}")
        out.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(out).sort().values


class ImageClassificationDataModule(L.LightningDataModule):
    """CIFAR-10 or any ImageFolder dataset, decoded once and served from uint8 tensors.

    Layouts accepted under the data root:
      * ImageFolder: ``<dataset dir>/train/<class>/*`` and ``<dataset dir>/test/<class>/*``,
        where ``<dataset dir>`` is ``<root>/<dataset>`` or the root itself;
      * for CIFAR-10 also torchvision's own ``cifar-10-batches-py`` under either place,
        downloaded through torchvision when neither layout exists and ``download`` is set.

    Batches are ``(images, labels)`` with images (B, C, H, W) float in [0, 1] after
    transfer (augmented in training), labels (B,) int64. ``batch_size`` is the global batch:
    under DDP each rank loads ``batch_size // world_size``.

    Args:
        dataset: ``"cifar10"`` or the name of an ImageFolder dataset directory under the root;
            ``"digits"``, when no root holds it, is scikit-learn's handwritten digits built
            into ``<cache_dir>/datasets/digits`` (:mod:`raeg_pl.data.digits`).
        data_dir: data root; default ``$RAEG_DATA_DIR``, else ``./data``.
        cache_dir: decoded-tensor cache; default ``$RAEG_CACHE_DIR`` or the user cache folder.
        batch_size: global training batch size.
        eval_batch_size: global batch size for validation and test (default: 2x batch_size).
        val_per_class: images per class held out of the training folder for validation.
        train_per_class: per-class training subset size (None: all remaining).
        test_per_class: per-class subset of the clean test split (None: all).
        seed: seed of the train/val split and the subsets.
        augment: random crop with padding and horizontal flip on training batches.
        crop_padding: padding of the random crop.
        hflip: horizontal flips in augmentation.
        image_size: (H, W) to resize every image to; needed when sizes differ.
        download: allow a torchvision download of CIFAR-10 when nothing is found locally.
        num_workers: DataLoader workers (0 is fastest for in-memory tensors).
        train_dir: an ImageFolder split that replaces the dataset's training folder (a
            protected or recovered export); validation is carved from it, test stays clean.
        train_defense: the pirate's pre-processing of the training and validation images,
            applied once and stored as 8-bit: an image defence spec (``"jpeg:q=75"``,
            ``"gray"``...) in its real form, ``"classpattern[:sigma=S]"`` (class patterns
            estimated from the training images and labels, subtracted) or
            ``"inverse[:k=K,steps=N]"`` (a network fitted to K leaked clean/protected pairs
            among the training images, applied to all); see
            :mod:`raeg_pl.defenses.pirate`.
        clean_train_dir: the clean originals of ``train_dir`` (same relative file names),
            where ``inverse`` takes its leaked pairs from.
        val_on_test: also evaluate the clean test split after every epoch (logged as
            ``val/test_acc``) to report final and peak accuracy curves.
        on_device: keep every split on the training device and batch it there
            (:class:`DeviceBatches`) instead of DataLoaders; training order is then a
            per-epoch permutation seeded by ``seed`` (the global RNG does not enter), and
            ``num_workers`` is unused. Prediction always uses a DataLoader.
    """

    def __init__(
        self,
        dataset: str = "cifar10",
        data_dir: str | None = None,
        cache_dir: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_per_class: int = 500,
        train_per_class: int | None = None,
        test_per_class: int | None = None,
        seed: int = 0,
        augment: bool = True,
        crop_padding: int = 4,
        hflip: bool = True,
        image_size: tuple[int, int] | None = None,
        download: bool = True,
        num_workers: int = 0,
        train_dir: str | None = None,
        train_defense: str | None = None,
        clean_train_dir: str | None = None,
        val_on_test: bool = False,
        on_device: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.dataset = dataset
        self.root = resolve_data_root(data_dir)
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.val_per_class = val_per_class
        self.train_per_class = train_per_class
        self.test_per_class = test_per_class
        self.seed = seed
        self.augment = augment
        self.crop_padding = crop_padding
        self.hflip = hflip
        self.image_size = tuple(image_size) if image_size else None
        self.download = download
        self.num_workers = num_workers
        self.train_dir = Path(train_dir) if train_dir else None
        self.train_defense = train_defense if train_defense not in (None, "", "none") else None
        self.clean_train_dir = Path(clean_train_dir) if clean_train_dir else None
        #: What the pirate's pre-processing measured (the learned inverse's fit), after setup.
        self.train_defense_stats: dict = {}
        self.val_on_test = val_on_test
        self.on_device = on_device
        self._located: _Located | None = None
        self._classes: list[str] | None = None
        self._channels: int | None = None
        self.train_set = self.val_set = self.test_set = None

    # ----------------------------------------------------------------- locating the data
    def _candidates(self) -> list[Path]:
        if (self.root / self.dataset).exists() or self.dataset != "cifar10":
            return [self.root / self.dataset, self.root]
        return [self.root / "cifar10", self.root / "CIFAR10", self.root / "cifar-10", self.root]

    def locate(self) -> _Located:
        """Finds the dataset under the root; raises DatasetError naming every place tried."""
        if self._located is not None:
            return self._located
        tried = []
        for cand in self._candidates():
            train, test = cand / "train", cand / "test"
            tried.append(f"{train} + {test} (ImageFolder)")
            if train.is_dir() and test.is_dir():
                self._located = _Located(train, test, None)
                return self._located
            if self.dataset == "cifar10":
                tried.append(f"{cand / 'cifar-10-batches-py'} (torchvision format)")
                if (cand / "cifar-10-batches-py").is_dir():
                    self._located = _Located(None, None, cand)
                    return self._located
        if self.dataset == "cifar10" and self.download:
            target = self.root / "cifar10"
            try:
                import torchvision

                torchvision.datasets.CIFAR10(str(target), train=True, download=True)
                torchvision.datasets.CIFAR10(str(target), train=False, download=True)
                self._located = _Located(None, None, target)
                return self._located
            except Exception as e:  # noqa: BLE001 - reported together with the places tried
                tried.append(f"torchvision download into {target} failed: {e}")
        if self.dataset == "digits":
            # Generated offline from scikit-learn into the cache, never into the data root.
            from raeg_pl.data.digits import write_digits_imagefolder

            built = write_digits_imagefolder(self.cache_dir / "datasets" / "digits")
            self._located = _Located(built / "train", built / "test", None)
            return self._located
        raise DatasetError(
            f"dataset {self.dataset!r} not found under data root {self.root} "
            f"(set data_dir or ${DATA_DIR_ENV}). Looked for:\n  " + "\n  ".join(tried)
        )

    @property
    def classes(self) -> list[str]:
        """Class names in label order (sorted folder names; CIFAR-10's own order)."""
        if self._classes is None:
            loc = self.locate()
            if loc.train is not None:
                self._classes = list_image_folder(loc.train)[0]
            else:
                self._classes = list(CIFAR10_CLASSES)
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        """Number of image channels of the data as stored (1 for grayscale, else 3)."""
        if self._channels is None:
            loc = self.locate()
            if loc.train is not None:
                _, samples = list_image_folder(loc.train)
                self._channels = 1 if detect_mode(loc.train / samples[0][0]) == "L" else 3
            else:
                self._channels = 3
        return self._channels

    # ----------------------------------------------------------------------- decoding
    def _load(self, split: str) -> DecodedSplit:
        loc = self.locate()
        folder = loc.train if split == "train" else loc.test
        if split == "train" and self.train_dir is not None:
            folder = self.train_dir
        if folder is not None:
            mode = "L" if self.channels == 1 else "RGB"
            decoded, _, _ = load_split_cached(folder, self.cache_dir, mode, self.image_size)
            return decoded
        return read_cifar10_batches(loc.torchvision_root / "cifar-10-batches-py", split == "train")

    def prepare_data(self) -> None:
        # Decoding fills the cache once, on one process, before any rank loads it.
        self._load("train")
        self._load("test")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_full = self._load("train")
        test_full = self._load("test")
        self.train_indices, self.val_indices = stratified_split(
            train_full.labels, self.num_classes, self.val_per_class, self.seed
        )
        self.train_indices = per_class_subset(
            train_full.labels, self.train_indices, self.train_per_class, self.num_classes, self.seed
        )
        if self.train_dir is not None and train_full.classes != self.classes:
            raise DatasetError(
                f"{self.train_dir}: classes {train_full.classes} differ from the test split's "
                f"{self.classes}"
            )
        test_idx = per_class_subset(
            test_full.labels,
            torch.arange(len(test_full.labels)),
            self.test_per_class,
            self.num_classes,
            self.seed,
        )
        self.train_files = [train_full.files[i] for i in self.train_indices.tolist()]
        train_images = train_full.images
        if self.train_defense:
            # The pirate's pre-processing, once, in its real 8-bit form (real JPEG codec...).
            train_images = self._pirate_preprocessing(train_full)
        self.train_set = TensorImageDataset(
            train_images[self.train_indices], train_full.labels[self.train_indices]
        )
        self.val_set = TensorImageDataset(
            train_images[self.val_indices], train_full.labels[self.val_indices]
        )
        self.test_set = TensorImageDataset(test_full.images[test_idx], test_full.labels[test_idx])

    def _pirate_preprocessing(self, train_full: DecodedSplit) -> torch.Tensor:
        """``train_defense`` applied to the whole training folder (N, C, H, W) uint8."""
        from raeg_pl.defenses.pirate import (
            learned_inverse_uint8,
            parse_pirate_defense,
            remove_class_patterns_uint8,
        )

        defense = parse_pirate_defense(self.train_defense)
        images, labels = train_full.images, train_full.labels
        if defense.kind == "image":
            return apply_defense_uint8(images, self.train_defense)
        if defense.kind == "labelled":
            return remove_class_patterns_uint8(
                images, labels, self.num_classes, defense.params["sigma"], self.train_indices
            )
        if defense.kind == "paired":
            clean_split = self._clean_split()
            pairs, clean = self._leaked_pairs(train_full, int(defense.params["k"]), clean_split)
            restored, stats = learned_inverse_uint8(
                images,
                labels,
                self.num_classes,
                pairs,
                clean,
                steps=int(defense.params["steps"]),
                seed=self.seed,
                restarts=int(defense.params["restarts"]),
            )
            stats.update(self._inverse_quality(train_full, restored, pairs, clean_split))
            self.train_defense_stats = stats
            return restored
        raise ValueError(
            f"train_defense {self.train_defense!r} changes the training loop, not the data: "
            f"give the classifier {defense.model} instead"
        )

    def _clean_split(self) -> DecodedSplit:
        """The clean originals of the training folder (:attr:`clean_train_dir`), decoded.

        Raises:
            DatasetError: no clean folder given.
        """
        if self.clean_train_dir is None:
            raise DatasetError(
                f"train_defense {self.train_defense!r} needs clean_train_dir: the clean "
                f"originals of {self.train_dir or 'the training folder'}"
            )
        mode = "L" if self.channels == 1 else "RGB"
        clean, _, _ = load_split_cached(self.clean_train_dir, self.cache_dir, mode, self.image_size)
        return clean

    def _inverse_quality(
        self,
        train_full: DecodedSplit,
        restored: torch.Tensor,
        pairs: torch.Tensor,
        clean: DecodedSplit,
    ) -> dict:
        """How close the learned inverse brings the pirate's images to their originals.

        Mean per-image PSNR (dB) against the clean originals, before and after the inverse,
        on the leaked pairs and on the pirate's other training images (``heldout_*``: what
        the evaluator sees and the pirate cannot measure; images without a clean original
        are left out). Runs after :meth:`_leaked_pairs`, which has checked the sizes.
        """
        from raeg_pl.metrics.image_quality import psnr_db

        where = {f: i for i, f in enumerate(clean.files)}
        leaked = set(pairs.tolist())
        held = [
            i
            for i in self.train_indices.tolist()
            if i not in leaked and train_full.files[i] in where
        ]
        out: dict = {"heldout_images": len(held)}
        for name, idx in (("pair", pairs.tolist()), ("heldout", held)):
            if not idx:
                continue
            originals = clean.images[[where[train_full.files[i]] for i in idx]]
            for when, imgs in (("before", train_full.images[idx]), ("after", restored[idx])):
                out[f"{name}_psnr_{when}"] = round(float(psnr_db(imgs, originals).mean()), 3)
        return out

    def _leaked_pairs(
        self, train_full: DecodedSplit, k: int, clean: DecodedSplit
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A seeded choice of ``k`` training images and their clean originals.

        Args:
            train_full: the (protected) training folder.
            k: pairs to leak.
            clean: :meth:`_clean_split`.

        Returns:
            ``(indices, clean)``: (k,) indices into the training folder and (k, C, H, W)
            uint8 originals, read from :attr:`clean_train_dir` by relative file name.

        Raises:
            DatasetError: too few training images, or a chosen file missing from the clean
                folder (named), or of another size.
        """
        if k > len(self.train_indices):
            raise DatasetError(
                f"train_defense {self.train_defense!r}: {k} leaked pairs asked for, only "
                f"{len(self.train_indices)} training images"
            )
        g = torch.Generator().manual_seed(self.seed + 104_729)
        chosen = self.train_indices[torch.randperm(len(self.train_indices), generator=g)[:k]]
        where = {f: i for i, f in enumerate(clean.files)}
        missing = [train_full.files[i] for i in chosen.tolist() if train_full.files[i] not in where]
        if missing:
            raise DatasetError(
                f"{self.clean_train_dir}: no clean original of {len(missing)} leaked pair(s) of "
                f"{self.train_dir or 'the training folder'}, e.g. {missing[0]!r}: the protected "
                "and clean folders must hold the same relative file names"
            )
        originals = clean.images[[where[train_full.files[i]] for i in chosen.tolist()]]
        if originals.shape[1:] != train_full.images.shape[1:]:
            raise DatasetError(
                f"{self.clean_train_dir}: images of shape {tuple(originals.shape[1:])}, the "
                f"training folder's are {tuple(train_full.images.shape[1:])}"
            )
        return chosen, originals

    @property
    def split_sizes(self) -> dict[str, int]:
        """Number of images in each split after subsetting (after ``setup``)."""
        return {"train": len(self.train_set), "val": len(self.val_set), "test": len(self.test_set)}

    # ---------------------------------------------------------------------- loaders
    def _per_rank(self, global_batch: int) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        if global_batch % world:
            raise ValueError(f"batch size {global_batch} does not split over {world} ranks")
        return global_batch // world

    def _loader(
        self, ds: TensorImageDataset, batch: int, shuffle: bool, drop_last: bool = False
    ) -> DataLoader | DeviceBatches:
        if self.on_device:
            return self._device_loader(ds, batch, shuffle, drop_last)
        return self._dataloader(ds, batch, shuffle, drop_last)

    def _dataloader(self, ds: Dataset, batch: int, shuffle: bool, drop_last: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=self._per_rank(batch),
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            collate_fn=_collate_batch,
            persistent_workers=self.num_workers > 0,
        )

    def _device_loader(
        self, ds: TensorImageDataset, batch: int, shuffle: bool, drop_last: bool
    ) -> DeviceBatches:
        trainer = self.trainer
        if trainer is not None:
            rank, world, device = (
                trainer.global_rank,
                trainer.world_size,
                trainer.strategy.root_device,
            )
        else:
            rank, world, device = 0, 1, torch.device("cpu")
        sampler = DeviceBatchSampler(
            len(ds), self._per_rank(batch), shuffle, drop_last, self.seed, rank, world
        )
        return DeviceBatches(ds, sampler, device)

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        # Drop the ragged last batch (BatchNorm on a handful of images is noisy) unless the
        # whole split is smaller than one batch. On the device the batches are cut from the
        # global order, hence the global batch there (the same test on one process).
        limit = self.batch_size if self.on_device else self._per_rank(self.batch_size)
        return self._loader(
            self.train_set, self.batch_size, shuffle=True, drop_last=len(self.train_set) > limit
        )

    def val_dataloader(self) -> DataLoader | DeviceBatches | list[DataLoader | DeviceBatches]:
        val = self._loader(self.val_set, self.eval_batch_size, shuffle=False)
        if self.val_on_test:
            return [val, self.test_dataloader()]
        return val

    def test_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader(self.test_set, self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        # A DataLoader even on the device: Lightning records prediction indices only there.
        return self._dataloader(self.test_set, self.eval_batch_size, False, False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = batch
        if self.augment and self.trainer is not None and self.trainer.training:
            # Crops and flips move whole pixels, so they run on uint8 before the conversion.
            images = random_crop_flip(images, self.crop_padding, self.hflip)
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        return images, labels
