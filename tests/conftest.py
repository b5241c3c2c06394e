"""Shared fixtures: the real CIFAR-10 copy, a private decoded-tensor cache, tiny folders."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from raeg_pl.data.datamodule import resolve_data_root

REPO = Path(__file__).resolve().parents[1]


def _data_required() -> bool:
    return bool(os.environ.get("RAEG_REQUIRE_DATA") or os.environ.get("CI"))


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The data root holding ``cifar10/{train,test}``; fails in CI when it is missing."""
    root = resolve_data_root(None)
    if not (root / "cifar10" / "train").is_dir() or not (root / "cifar10" / "test").is_dir():
        msg = (
            f"real CIFAR-10 not found at {root}/cifar10/{{train,test}}; "
            "set RAEG_DATA_DIR to the folder that holds cifar10/"
        )
        if _data_required():
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """The decoded-tensor cache: $RAEG_CACHE_DIR when set (reused across runs), else temporary."""
    env = os.environ.get("RAEG_CACHE_DIR")
    return Path(env) if env else tmp_path_factory.mktemp("cache")


@pytest.fixture()
def small_folder(data_root, tmp_path) -> Path:
    """A real ImageFolder dataset: 12 train and 4 test CIFAR-10 JPEGs for each of 3 classes."""
    out = tmp_path / "tiny"
    for split, n in (("train", 12), ("test", 4)):
        for cls in ("airplane", "cat", "ship"):
            src = sorted((data_root / "cifar10" / split / cls).iterdir())[:n]
            dst = out / split / cls
            dst.mkdir(parents=True)
            for f in src:
                shutil.copy2(f, dst / f.name)
    return out
