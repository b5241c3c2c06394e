"""Decode-once uint8 tensor cache for image-classification folders.

An ImageFolder split (``<split>/<class>/<file>``) is decoded a single time into a
``(N, C, H, W)`` uint8 tensor plus labels and stored under a cache directory of its own
(never next to the source images: data roots are treated as read-only). The cache key is a
fingerprint of the split's file list, sizes and modification times, so a changed source
rebuilds the cache and an unchanged one is reused across runs.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from raeg_pl.io.reader import ImageFolderError, list_class_folder

CACHE_FORMAT_VERSION = 1


class DatasetError(RuntimeError):
    """A dataset root or file that cannot be used, with the places and reasons named."""


@dataclass
class DecodedSplit:
    """One decoded split.

    Attributes:
        images: (N, C, H, W) uint8.
        labels: (N,) int64 class indices following the sorted class-folder names.
        classes: class names, index-aligned with ``labels``.
        files: paths relative to the split folder, index-aligned with ``images``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    files: list[str]


def default_cache_dir() -> Path:
    """The cache root: ``$RAEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/raeg_pl``, else ``~/.cache/raeg_pl``."""
    if os.environ.get("RAEG_CACHE_DIR"):
        return Path(os.environ["RAEG_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "raeg_pl"


def list_image_folder(split_dir: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """Lists an ImageFolder split (:func:`raeg_pl.io.reader.list_class_folder`).

    Returns:
        (classes, samples) where samples are (relative path, class index), sorted.

    Raises:
        DatasetError: if the folder has no class sub-folders or no images.
    """
    try:
        return list_class_folder(split_dir)
    except ImageFolderError as e:
        raise DatasetError(str(e)) from e


def fingerprint_files(split_dir: Path, samples: list[tuple[str, int]], extra: str = "") -> str:
    """SHA-256 over relative path, size and mtime of every file, plus ``extra`` settings."""
    h = hashlib.sha256(f"v{CACHE_FORMAT_VERSION}|{extra}".encode())
    for rel, label in samples:
        st = os.stat(split_dir / rel)
        h.update(f"{rel}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _decode(path: Path, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im = im.convert(mode)
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot decode image ({e})") from e
    return arr[:, :, None] if arr.ndim == 2 else arr


def detect_mode(path: Path) -> str:
    """'L' for single-channel images, else 'RGB'."""
    try:
        with Image.open(path) as im:
            return "L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB"
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetError(f"{path}: cannot read image ({e})") from e


def decode_split(
    split_dir: Path,
    classes: list[str],
    samples: list[tuple[str, int]],
    mode: str,
    image_size: tuple[int, int] | None = None,
    num_threads: int | None = None,
) -> DecodedSplit:
    """Decodes every image of a split into one uint8 tensor.

    Images must share one size unless ``image_size`` (H, W) is given, in which case they are
    resized to it with bicubic interpolation.
    """
    paths = [split_dir / rel for rel, _ in samples]
    if image_size is None:
        with Image.open(paths[0]) as im:
            image_size = (im.size[1], im.size[0])
        fixed = image_size
        resize = None
    else:
        fixed = tuple(image_size)
        resize = fixed
    c = 1 if mode == "L" else 3
    out = np.empty((len(paths), fixed[0], fixed[1], c), dtype=np.uint8)

    def work(i: int) -> None:
        arr = _decode(paths[i], mode, resize)
        if arr.shape[:2] != fixed:
            raise DatasetError(
                f"{paths[i]}: size {arr.shape[1]}x{arr.shape[0]} differs from {fixed[1]}x{fixed[0]}; "
                "set image_size to resize every image"
            )
        out[i] = arr

    with ThreadPoolExecutor(max_workers=num_threads or min(8, os.cpu_count() or 1)) as pool:
        list(pool.map(work, range(len(paths)), chunksize=256))
    images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([lab for _, lab in samples], dtype=torch.int64)
    return DecodedSplit(images, labels, classes, [rel for rel, _ in samples])


def atomic_torch_save(obj, path: Path) -> None:
    """Writes ``obj`` with torch.save to a temporary file in the same folder, then renames."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_split_cached(
    split_dir: Path,
    cache_dir: Path,
    mode: str | None = None,
    image_size: tuple[int, int] | None = None,
) -> tuple[DecodedSplit, Path, bool]:
    """Returns a decoded split, from the cache when its fingerprint matches the source.

    Returns:
        (split, cache file, whether the cache was reused).
    """
    split_dir = Path(split_dir).resolve()
    classes, samples = list_image_folder(split_dir)
    if mode is None:
        mode = detect_mode(split_dir / samples[0][0])
    key = fingerprint_files(split_dir, samples, extra=f"{split_dir}|{mode}|{image_size}")
    cache_file = Path(cache_dir) / f"{split_dir.parent.name}_{split_dir.name}_{key[:16]}.pt"
    if cache_file.exists():
        try:
            blob = torch.load(cache_file, weights_only=True)
            if blob.get("key") == key:
                return (
                    DecodedSplit(
                        blob["images"], blob["labels"], list(blob["classes"]), list(blob["files"])
                    ),
                    cache_file,
                    True,
                )
        except Exception:  # noqa: BLE001 - a corrupt cache is rebuilt, never trusted
            pass
    split = decode_split(split_dir, classes, samples, mode, image_size)
    atomic_torch_save(
        {
            "key": key,
            "images": split.images,
            "labels": split.labels,
            "classes": split.classes,
            "files": split.files,
        },
        cache_file,
    )
    return split, cache_file, False
