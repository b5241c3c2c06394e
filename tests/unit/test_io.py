"""Protected-dataset files: PNG export, manifest, verification, reading back."""

from __future__ import annotations

import json

import pytest
import torch

from raeg_pl.io.protected import (
    MANIFEST,
    is_complete,
    load_export,
    sha256_file,
    verify_folder,
    write_image_folder,
)


@pytest.fixture()
def images():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 9, 7), generator=g, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    files = [f"{['cat', 'dog'][int(labels[i])]}/{i:04d}.jpg" for i in range(6)]
    return x, labels, ["cat", "dog"], files


def test_export_round_trip_is_exact_and_hashed(tmp_path, images):
    x, labels, classes, files = images
    manifest = write_image_folder(
        tmp_path / "out", x, labels, classes, files, kind="clean", batch_size=4
    )
    assert is_complete(tmp_path / "out")
    assert manifest["num_images"] == 6 and manifest["kind"] == "clean"
    assert sorted(manifest["files"]) == sorted(f"train/{f[:-4]}.png" for f in files)
    for rel, entry in manifest["files"].items():
        assert sha256_file(tmp_path / "out" / rel) == entry["sha256"]
    assert not list((tmp_path / "out").rglob("*.tmp")), "no temporary file may remain"
    back, back_labels, back_classes, rels, _ = load_export(tmp_path / "out")
    order = [files.index(r[len("train/") : -4] + ".jpg") for r in rels]
    assert torch.equal(back, x[order]) and torch.equal(back_labels, labels[order])
    assert back_classes == classes


def test_transform_output_is_rounded_to_8_bits(tmp_path, images):
    x, labels, classes, files = images
    write_image_folder(
        tmp_path / "out",
        x,
        labels,
        classes,
        files,
        kind="protected",
        transform=lambda t: t * 0.5 + 0.25,
    )
    back, *_ = load_export(tmp_path / "out")
    rels = sorted(json.loads((tmp_path / "out" / MANIFEST).read_text())["files"])
    order = [files.index(r[len("train/") : -4] + ".jpg") for r in rels]
    expected = ((x[order].float() / 255 * 0.5 + 0.25) * 255).round().to(torch.uint8)
    assert torch.equal(back, expected)


def test_label_conditioned_protector_exports_and_restores_with_the_labels(tmp_path, images):
    from raeg_pl.models.protector import InvertibleProtector

    x, labels, classes, files = images
    net = InvertibleProtector(levels=1, blocks_per_level=1, hidden_channels=4, num_classes=2)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.002 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    prot = tmp_path / "prot"
    write_image_folder(prot, x, labels, classes, files, kind="protected", transform=net)
    p_images, p_labels, _, rels, _ = load_export(prot)
    order = [files.index(r[len("train/") : -4] + ".jpg") for r in rels]
    assert (p_images.int() - x[order].int()).abs().float().mean() > 1.0  # a real change
    # Restoring reads the labels back from the class folders of the protected export.
    sources = [r[len("train/") :] for r in rels]
    write_image_folder(
        tmp_path / "rec", p_images, p_labels, classes, sources, kind="recovered",
        transform=net.inverse, batch_size=4,
    )  # fmt: skip
    restored, *_ = load_export(tmp_path / "rec")
    # Close to the originals (8-bit rounding, and clipping at 0/255 of these noise images).
    assert (restored.int() - x[order].int()).abs().float().mean() < 0.5


def test_verification_names_missing_modified_and_extra_files(tmp_path, images):
    x, labels, classes, files = images
    out = tmp_path / "out"
    manifest = write_image_folder(out, x, labels, classes, files, kind="protected")
    rels = sorted(manifest["files"])
    (out / rels[0]).unlink()
    raw = bytearray((out / rels[1]).read_bytes())
    raw[-20] ^= 0xFF
    (out / rels[1]).write_bytes(bytes(raw))
    (out / "train" / "cat" / "stray.png").write_bytes((out / rels[2]).read_bytes())
    assert verify_folder(out) == {
        "missing": [rels[0]],
        "modified": [rels[1]],
        "extra": ["train/cat/stray.png"],
    }
    with pytest.raises(ValueError, match=rels[0].split("/")[-1]):
        load_export(out)


def test_folder_without_manifest_is_a_clear_error(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest"):
        load_export(tmp_path / "x")
