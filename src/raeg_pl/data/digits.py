"""A second, offline dataset of another kind: scikit-learn's handwritten digits as an ImageFolder.

``sklearn.datasets.load_digits`` ships with scikit-learn (no download): 1,797 real 8x8
grayscale scans of handwritten digits, 10 classes, 16 grey levels, on black backgrounds
(30% of the pixels are exactly 0 at 32x32, 49% of the 8x8 scans). It is the opposite of CIFAR-10 for a
protector: one channel and large saturated regions, where whatever the protector adds
below 0 is clipped by 8-bit storage and cannot be inverted.

:func:`write_digits_imagefolder` writes it as ``<out>/train/<digit>/<index>.png`` and
``<out>/test/<digit>/<index>.png`` (8-bit grayscale PNG, levels ``round(v * 255 / 16)``,
upscaled with bilinear resampling to ``size x size`` so the protector's Haar levels apply),
split per class with a seeded shuffle. The folder is built beside its destination and
renamed into place, so a reader never sees a half-written dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from raeg_pl.data.cache import DatasetError, default_cache_dir
from raeg_pl.io.writer import encode_png
from raeg_pl.utils.quantize import to_uint8

__all__ = [
    "DIGITS_MARKER",
    "default_digits_dir",
    "digits_arrays",
    "write_digits_imagefolder",
]

#: The file that marks a folder as written by :func:`write_digits_imagefolder`, with its settings.
DIGITS_MARKER = "raeg_digits.json"
_FORMAT = 1


def default_digits_dir() -> Path:
    """Where the data module builds ``dataset: digits`` when no data root holds it.

    ``<cache root>/datasets/digits`` (:func:`raeg_pl.data.cache.default_cache_dir`): a
    generated dataset lives in the cache, never in a data root.
    """
    return default_cache_dir() / "datasets" / "digits"


def digits_arrays(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The digits as 8-bit images.

    Args:
        size: output side; the 8x8 scans are upscaled with PIL's bilinear resampling
            (8 keeps them as they are).

    Returns:
        ``(images, labels)``: (1797, size, size) uint8 in [0, 255] (levels ``round(v * 255 / 16)``) and (1797,) int64 in [0, 9].
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    if size < 8:
        raise ValueError(f"size must be at least 8, got {size}")
    bunch = load_digits()
    # The scans hold 0..16; 16 maps to 255 (8 to 127.5, rounded half to even: 128).
    small = to_uint8(torch.from_numpy(bunch.images / 16.0)).numpy()
    if size == 8:
        images = small
    else:
        images = np.stack(
            [np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in small]
        )
    return images, bunch.target.astype(np.int64)


def _split(labels: np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """(N,) bool, True for test: ``round(n_c * test_fraction)`` of each class after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        is_test[idx[: int(round(len(idx) * test_fraction))]] = True
    return is_test


def _under(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True


def _read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / DIGITS_MARKER).read_text())
    except (OSError, ValueError):
        return None


def write_digits_imagefolder(
    out: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    size: int = 32,
) -> Path:
    """Writes scikit-learn's digits as an ImageFolder with a seeded per-class train/test split.

    Layout: ``<out>/train/<digit>/<index>.png`` and ``<out>/test/<digit>/<index>.png``
    (``index`` is the image's position in ``load_digits``), grayscale 8-bit PNG, plus
    ``<out>/raeg_digits.json`` with the settings and counts. A folder this function already
    wrote with the same settings is returned as it is.

    Args:
        out: destination folder; default :func:`default_digits_dir`. Must not lie in the
            data root (``$RAEG_DATA_DIR``), which is read-only.
        seed: seed of the split.
        test_fraction: share of each class in ``test`` (0 < f < 1).
        size: image side (bilinear upscaling of the 8x8 scans); a multiple of 4 for the
            protector's 2-level Haar transform.

    Returns:
        The folder.

    Raises:
        DatasetError: ``out`` lies in the data root, is a file, is a non-empty folder not
            written by this function, or was written with other settings.
    """
    out = Path(out).expanduser() if out else default_digits_dir()
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    settings = {"format": _FORMAT, "seed": seed, "test_fraction": test_fraction, "size": size}
    data_root = os.environ.get("RAEG_DATA_DIR")
    if data_root and _under(out, Path(data_root)):
        raise DatasetError(
            f"{out}: inside the data root {data_root} ($RAEG_DATA_DIR), which is read-only; "
            "write the digits into the cache (the default) or another folder"
        )
    if out.exists():
        done = _check_existing(out, settings)
        if done:
            return out
    images, labels = digits_arrays(size)
    is_test = _split(labels, test_fraction, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        counts = {"train": 0, "test": 0}
        for i, (img, y, test) in enumerate(zip(images, labels, is_test)):
            split = "test" if test else "train"
            folder = tmp / split / str(int(y))
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:04d}.png").write_bytes(encode_png(img[None]))
            counts[split] += 1
        marker = {**settings, "source": "sklearn.datasets.load_digits", "counts": counts}
        (tmp / DIGITS_MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        try:
            os.rename(tmp, out)
        except OSError:
            # Another process finished first: keep its folder if it holds the same dataset.
            if out.is_dir() and _check_existing(out, settings):
                return out
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_existing(out: Path, settings: dict) -> bool:
    """True when ``out`` already holds these digits; False when it is an empty folder."""
    if not out.is_dir():
        raise DatasetError(f"{out}: exists and is not a folder")
    if not any(out.iterdir()):
        return False
    marker = _read_marker(out)
    if marker is None:
        raise DatasetError(
            f"{out}: a non-empty folder that write_digits_imagefolder did not make (no "
            f"{DIGITS_MARKER}); choose an empty or new folder"
        )
    differ = {k: (marker.get(k), v) for k, v in settings.items() if marker.get(k) != v}
    if differ:
        listed = ", ".join(f"{k} {a!r} there, {b!r} asked" for k, (a, b) in differ.items())
        raise DatasetError(f"{out}: holds the digits written with other settings ({listed})")
    return True


def main(argv: list[str]) -> int:
    """``raeg data digits [--out DIR] [--seed S] [--test-fraction F] [--size N]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="raeg data",
        description="Write a bundled dataset as an ImageFolder (train/ and test/ class folders).",
    )
    parser.add_argument("name", choices=["digits"], help="scikit-learn's handwritten digits")
    parser.add_argument(
        "--out", default=None, help=f"destination folder (default: {default_digits_dir()})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/test split")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="test share per class")
    parser.add_argument("--size", type=int, default=32, help="image side (bilinear upscaling)")
    args = parser.parse_args(argv)
    try:
        out = write_digits_imagefolder(
            args.out, seed=args.seed, test_fraction=args.test_fraction, size=args.size
        )
    except (DatasetError, ValueError) as e:
        print(f"raeg data: {e}", file=sys.stderr)
        return 2
    counts = json.loads((out / DIGITS_MARKER).read_text())["counts"]
    print(f"{out}: {counts['train']} training and {counts['test']} test images")
    print(f"use it with: data.dataset=digits (built there by default) or data.data_dir={out}")
    return 0
