"""scikit-learn's digits as an ImageFolder: counts, split, 8-bit PNG, atomic writes, refusals."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raeg_pl.data.cache import DatasetError
from raeg_pl.data.digits import DIGITS_MARKER, digits_arrays, write_digits_imagefolder


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("d") / "digits"
    return write_digits_imagefolder(out, seed=0, test_fraction=0.2, size=32)


def _files(out: Path, split: str) -> list[Path]:
    return sorted((out / split).rglob("*.png"))


def test_counts_and_per_class_split(digits) -> None:
    from sklearn.datasets import load_digits

    target = load_digits().target
    per_class = Counter(target.tolist())
    train, test = _files(digits, "train"), _files(digits, "test")
    assert len(train) + len(test) == 1797
    test_counts = Counter(int(p.parent.name) for p in test)
    assert set(test_counts) == set(range(10))
    for c, n in per_class.items():
        assert test_counts[c] == round(n * 0.2), c
    # Every file sits in the folder of its digit, and no index is in both splits.
    names = [p.stem for p in train + test]
    assert len(set(names)) == 1797
    for p in train + test:
        assert target[int(p.stem)] == int(p.parent.name), p
    marker = json.loads((digits / DIGITS_MARKER).read_text())
    assert marker["counts"] == {"train": len(train), "test": len(test)}
    assert marker["seed"] == 0 and marker["size"] == 32


def test_pngs_are_8bit_grayscale_of_the_scans(digits) -> None:
    images, labels = digits_arrays(32)
    for p in _files(digits, "test")[:20]:
        with Image.open(p) as im:
            assert im.mode == "L" and im.size == (32, 32)
            arr = np.asarray(im)
        np.testing.assert_array_equal(arr, images[int(p.stem)])
    # Black backgrounds and full-intensity strokes survive (16 -> 255, 0 stays 0).
    small, _ = digits_arrays(8)
    assert small.dtype == np.uint8 and small.max() == 255 and (small == 0).mean() > 0.4
    assert (images == 0).mean() > 0.25


def test_split_is_seeded(tmp_path, digits) -> None:
    again = write_digits_imagefolder(tmp_path / "again", seed=0)
    other = write_digits_imagefolder(tmp_path / "other", seed=1)
    stems = lambda d: sorted(p.stem for p in _files(d, "test"))  # noqa: E731
    assert stems(again) == stems(digits)
    assert stems(other) != stems(digits)


def test_existing_folder_reused_refused_or_named(tmp_path, digits) -> None:
    stamp = (digits / DIGITS_MARKER).stat().st_mtime_ns
    assert write_digits_imagefolder(digits, seed=0) == digits
    assert (digits / DIGITS_MARKER).stat().st_mtime_ns == stamp  # not rewritten
    with pytest.raises(DatasetError, match="other settings.*seed 0 there, 1 asked"):
        write_digits_imagefolder(digits, seed=1)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(DatasetError, match=rf"{foreign}.*did not make"):
        write_digits_imagefolder(foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(_files(write_digits_imagefolder(empty), "train")) > 1000
    with pytest.raises(ValueError, match="test_fraction"):
        write_digits_imagefolder(tmp_path / "x", test_fraction=1.0)


def test_refuses_the_data_root(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RAEG_DATA_DIR", str(tmp_path / "root"))
    with pytest.raises(DatasetError, match="data root"):
        write_digits_imagefolder(tmp_path / "root" / "digits")
    assert not (tmp_path / "root").exists()


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch) -> None:
    calls = {"n": 0}
    save = Image.Image.save

    def failing_save(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 50:
            raise OSError("disk full")
        return save(self, *a, **k)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_digits_imagefolder(tmp_path / "digits")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling


def test_data_module_builds_digits_into_its_cache(tmp_path, monkeypatch) -> None:
    from raeg_pl.data import ImageClassificationDataModule

    monkeypatch.setenv("RAEG_DATA_DIR", str(tmp_path / "empty_root"))
    dm = ImageClassificationDataModule(
        dataset="digits", cache_dir=str(tmp_path / "cache"), train_per_class=None, val_per_class=20
    )
    dm.setup("fit")
    assert dm.channels == 1 and dm.classes == [str(d) for d in range(10)]
    assert (tmp_path / "cache" / "datasets" / "digits" / DIGITS_MARKER).is_file()
    assert not (tmp_path / "empty_root").exists()
    sizes = dm.split_sizes
    assert sizes["val"] == 200 and sizes["train"] + sizes["val"] == 1438
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape[1:] == (1, 32, 32) and images.dtype.is_floating_point is False


def test_cli_writes_and_reports(tmp_path, capsys) -> None:
    from raeg_pl.cli import main

    out = tmp_path / "d"
    assert main(["data", "digits", "--out", str(out), "--size", "16"]) == 0
    assert "1438 training and 359 test images" in capsys.readouterr().out
    with Image.open(_files(out, "train")[0]) as im:
        assert im.size == (16, 16)
    assert main(["data", "digits", "--out", str(out)]) == 2  # other size there
    assert "size 16 there, 32 asked" in capsys.readouterr().err
