"""The owner tools with a grayscale (1-channel) key, as the pipeline writes for grey data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from raeg_pl.io.keyfile import save_key
from raeg_pl.io.manifest import read_manifest
from raeg_pl.io.protect import protect_folder
from raeg_pl.io.reader import DecodedImage, ImageDecodeError, key_planes
from raeg_pl.io.restore import restore_folder
from raeg_pl.io.verify import verify_store
from raeg_pl.models.protector import InvertibleProtector


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _gray_key(path) -> None:
    torch.manual_seed(0)
    net = InvertibleProtector(1, 2, 2, 16, num_classes=2).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.002 * torch.randn(p.shape, generator=g))
    save_key(net, path, classes=["zero", "one"])


def test_key_planes_take_grey_planes_and_refuse_colour() -> None:
    grey = np.repeat(np.arange(12, dtype=np.uint8).reshape(3, 4, 1), 3, axis=2)
    img = DecodedImage(grey, None, [], "PNG", "L")
    assert key_planes(img, 1).shape == (1, 3, 4)
    assert np.array_equal(key_planes(img, 1)[0], grey[..., 0])
    assert key_planes(img, 3).shape == (3, 3, 4)
    colour = grey.copy()
    colour[0, 0, 2] = 200
    with pytest.raises(ImageDecodeError, match="colour image.*grayscale"):
        key_planes(DecodedImage(colour, None, [], "PNG", "RGB"), 1)


def test_grey_folder_protects_verifies_and_restores_bit_exact(tmp_path) -> None:
    key = tmp_path / "g.raegkey"
    _gray_key(key)
    src = tmp_path / "in"
    rng = np.random.default_rng(0)
    originals = {}
    for i in range(4):
        cls = ["zero", "one"][i % 2]
        (src / cls).mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, (32, 32), dtype=np.uint8)
        arr[:8] = 0  # black background
        Image.fromarray(arr).save(src / cls / f"{i}.png")
        originals[f"{cls}/{i}.png"] = arr
    # A grey image with alpha, and a grey image stored as RGB: both protected as grey.
    la = np.stack([originals["zero/0.png"], np.full((32, 32), 200, np.uint8)], axis=2)
    Image.fromarray(la, "LA").save(src / "zero" / "la.png")
    Image.fromarray(np.repeat(originals["one/1.png"][..., None], 3, axis=2)).save(
        src / "one" / "rgbgrey.png"
    )
    colour = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(colour).save(src / "one" / "colour.png")

    out = tmp_path / "out"
    summary = protect_folder(key, src, out, progress=False, lossless=True)
    assert sorted(summary.failed) == ["one/colour.png"]
    assert "grayscale" in summary.failed["one/colour.png"]
    assert len(summary.written) == 6
    files = read_manifest(out)["files"]
    assert files["zero/la.png"]["mode"] == "LA" and files["zero/0.png"]["mode"] == "L"
    with Image.open(out / "zero" / "0.png") as im:
        assert im.mode == "L"
        assert not np.array_equal(np.asarray(im), originals["zero/0.png"])
    assert verify_store(out).ok

    restored = restore_folder(key, out, tmp_path / "rest", progress=False)
    assert restored.ok and restored.exact == 6
    for rel, arr in originals.items():
        with Image.open(tmp_path / "rest" / rel) as im:
            assert im.mode == "L" and np.array_equal(np.asarray(im), arr)
    with Image.open(tmp_path / "rest" / "zero" / "la.png") as im:
        assert im.mode == "LA" and np.array_equal(np.asarray(im), la)

    approx = restore_folder(key, out, tmp_path / "approx", progress=False, find_sidecar=False)
    assert approx.ok and len(approx.written) == 6
    # Asked not to search, the note says so instead of claiming the sidecar is missing.
    assert any("approximate restore, as asked" in n for n in approx.notes), approx.notes
    assert not any("no lossless sidecar at" in n for n in approx.notes), approx.notes
    with Image.open(tmp_path / "approx" / "zero" / "0.png") as im:
        err = np.abs(np.asarray(im).astype(int) - originals["zero/0.png"]).mean()
    assert err < 4, err
