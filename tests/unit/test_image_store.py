"""The unified image store: old manifests and sidecars, manifest versions, apply_protector,
the residual codec, and the one suffix list."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raeg_pl.io.apply import apply_protector, protector_values
from raeg_pl.io.keyfile import load_key
from raeg_pl.io.manifest import FORMAT_VERSION, ManifestError, read_manifest
from raeg_pl.io.protected import load_export, verify_folder, write_image_folder
from raeg_pl.io.reader import IMAGE_SUFFIXES, decode_image, list_class_folder
from raeg_pl.io.restore import restore_folder
from raeg_pl.io.sidecar import decode_residual, encode_residual, residual_codec
from raeg_pl.io.verify import verify_store
from raeg_pl.models.protector import InvertibleProtector

LEGACY = Path(__file__).resolve().parents[1] / "data" / "legacy"


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im).copy()


@pytest.fixture()
def legacy(tmp_path: Path) -> Path:
    """A writable copy of the legacy fixtures (restore looks beside its input)."""
    root = tmp_path / "legacy"
    shutil.copytree(LEGACY, root)
    return root


# ------------------------------------------------------------------------- old folders
def test_legacy_owner_folder_verifies_and_restores_bit_for_bit(legacy, tmp_path) -> None:
    manifest = read_manifest(legacy / "owner_v1", kind="protected")
    assert manifest["format_version"] == 1 and "protector_fingerprint" not in manifest
    assert verify_store(legacy / "owner_v1").ok
    assert verify_store(legacy / "owner_v1_restored").ok
    # Format-1 sidecars (bz2/zlib) still decode.
    sidecars = sorted((legacy / "owner_v1.sidecar").rglob("*.res"))
    assert {residual_codec(p.read_bytes()) for p in sidecars} <= {
        "zlib (format 1)",
        "bz2 (format 1)",
    }

    # The restore values are reproduced exactly: format 1 written now is byte-identical.
    net = load_key(legacy / "key.raegkey")
    for rel, entry in manifest["files"].items():
        prot = torch.from_numpy(_pixels(legacy / "owner_v1" / rel)[..., :3]).permute(2, 0, 1)
        values = protector_values(net, prot[None], inverse=True, tile=entry["tile"])[0].numpy()
        source = decode_image((legacy / "source" / entry["source"]).read_bytes())
        again = encode_residual(source.rgb.transpose(2, 0, 1), values, codecs=(0, 1))
        assert again == (legacy / "owner_v1.sidecar" / entry["sidecar"]["file"]).read_bytes()

    # A plain restore finds the sidecar at its default place and is bit-exact.
    summary = restore_folder(
        legacy / "key.raegkey", legacy / "owner_v1", tmp_path / "rec", progress=False
    )
    assert summary.ok and summary.exact == 3, summary.report()
    assert any("sidecar found" in n for n in summary.notes)
    for rel, entry in manifest["files"].items():
        restored = _pixels(tmp_path / "rec" / rel)
        np.testing.assert_array_equal(restored, _pixels(legacy / "owner_v1_restored" / rel))
        source = decode_image((legacy / "source" / entry["source"]).read_bytes())
        np.testing.assert_array_equal(restored[..., :3], source.rgb)
    # The new restore is a format-2 manifest that the verifier accepts.
    assert read_manifest(tmp_path / "rec")["format_version"] == FORMAT_VERSION
    assert verify_store(tmp_path / "rec").ok

    # Approximate restore, as before: the same pixels as the old approximate path.
    shutil.move(legacy / "owner_v1.sidecar", tmp_path / "elsewhere.sidecar")
    approx = restore_folder(
        legacy / "key.raegkey", legacy / "owner_v1", tmp_path / "approx", progress=False
    )
    assert approx.ok and any("approximate restore" in n for n in approx.notes)
    for rel in manifest["files"]:
        prot = torch.from_numpy(_pixels(legacy / "owner_v1" / rel)[..., :3]).permute(2, 0, 1)[None]
        with torch.no_grad():
            old_way = (net.inverse(prot.float() / 255).clamp(0, 1) * 255).round().to(torch.uint8)
        np.testing.assert_array_equal(
            _pixels(tmp_path / "approx" / rel)[..., :3], old_way[0].permute(1, 2, 0).numpy()
        )


def test_legacy_pipeline_export_loads_verifies_and_restores_as_before(legacy) -> None:
    assert read_manifest(legacy / "pipeline_v0_protected").get("format") is None
    assert verify_folder(legacy / "pipeline_v0_protected") == {
        "missing": [],
        "modified": [],
        "extra": [],
    }
    images, labels, classes, rels, _ = load_export(legacy / "pipeline_v0_protected")
    assert classes == ["cat", "dog"] and labels.tolist() == [0, 1, 1]
    net = load_key(legacy / "key.raegkey")
    restored = apply_protector(net, images, labels, inverse=True)
    expected, *_ = load_export(legacy / "pipeline_v0_recovered")
    assert torch.equal(restored, expected)
    # Tampering with an old export is still found.
    (legacy / "pipeline_v0_protected" / rels[0]).write_bytes(b"not a png")
    assert verify_folder(legacy / "pipeline_v0_protected")["modified"] == [rels[0]]


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, "2", None])
def test_unknown_manifest_versions_fail_naming_file_and_version(legacy, tmp_path, version) -> None:
    folder = legacy / "owner_v1"
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format_version"] = version
    (folder / "manifest.json").write_text(json.dumps(manifest))
    pattern = rf"owner_v1/manifest\.json: manifest format_version {version!r}"
    if version == FORMAT_VERSION + 1:
        pattern = rf"owner_v1/manifest\.json: manifest format_version {version} is newer"
    with pytest.raises(ManifestError, match=pattern):
        verify_store(folder)
    with pytest.raises(ManifestError, match=pattern):
        restore_folder(legacy / "key.raegkey", folder, tmp_path / "rec", progress=False)
    assert not (tmp_path / "rec").exists()


def test_pipeline_exports_write_the_current_manifest(tmp_path) -> None:
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 1, 0])
    files = [f"{'ab'[int(y)]}/{i}.png" for i, y in enumerate(labels)]
    manifest = write_image_folder(tmp_path / "out", x, labels, ["a", "b"], files, "clean")
    assert manifest["format_version"] == FORMAT_VERSION and manifest["label_folder_level"] == 1
    assert read_manifest(tmp_path / "out") == manifest
    # A file moved to the other class folder is found by name (its label no longer fits).
    (tmp_path / "out/train/a/0.png").rename(tmp_path / "out/train/b/0.png")
    summary = verify_store(tmp_path / "out")
    assert list(summary.tampered) == ["train/b/0.png"] and not summary.missing
    assert verify_folder(tmp_path / "out")["modified"] == ["train/b/0.png"]
    # Sources outside class folders: labels are kept, folders are not cross-checked.
    flat = write_image_folder(
        tmp_path / "flat", x, labels, ["a", "b"], ["0.png", "1.png", "2.png", "3.png"], "clean"
    )
    assert flat["label_folder_level"] is None and verify_store(tmp_path / "flat").ok


# --------------------------------------------------------------------- apply_protector
def test_apply_protector_is_the_8_bit_storage_of_the_network_output() -> None:
    torch.manual_seed(0)
    net = InvertibleProtector(levels=2, blocks_per_level=1, hidden_channels=8, num_classes=3).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape) * 0.004)
    x = torch.randint(0, 256, (5, 3, 12, 20), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        reference = (net(x.float() / 255, y).clamp(0, 1) * 255).round().to(torch.uint8)
    out = apply_protector(net, x, y, batch_size=5)
    assert out.dtype == torch.uint8 and torch.equal(out, reference)
    assert (out != x).any() and torch.equal(
        apply_protector(net, x.numpy(), y.tolist(), batch_size=5), out
    )
    values = protector_values(net, x, y, batch_size=5)
    assert torch.equal(torch.round(values).to(torch.uint8), out)
    # Tiles: each 8x8 tile is processed alone; the tiled map is still exactly invertible.
    tiled = apply_protector(net, x, y, tile=8, batch_size=5)
    assert not torch.equal(tiled, out)
    back = apply_protector(net, tiled, y, inverse=True, tile=8)
    assert (back.int() - x.int()).abs().float().mean() < 1.0
    with pytest.raises(ValueError, match="conditioned on class labels"):
        apply_protector(net, x)
    with pytest.raises(ValueError, match="uint8"):
        apply_protector(net, x.float(), y)


# -------------------------------------------------------------------------- residuals
def test_residual_codec_is_exact_smaller_than_format_1_and_decodes_format_1() -> None:
    rng = np.random.default_rng(1)
    original = np.clip(rng.normal(120, 40, (3, 32, 32)), 0, 255).astype(np.uint8)
    # Mostly 0 / +-1 residuals, a few large ones (clipping), values on rounding boundaries.
    values = (original + rng.laplace(0, 0.6, original.shape)).astype(np.float32)
    values.reshape(-1)[:40:3] = np.floor(values.reshape(-1)[:40:3]) + 0.5
    values.reshape(-1)[7] = 0.2
    original.reshape(-1)[7] = 250  # a residual of 250: an escape for both codecs
    values = np.clip(values, 0, 255)
    legacy_size = {p.name: p.stat().st_size for p in LEGACY.rglob("*.res")}
    assert legacy_size  # the fixtures exist
    for codecs in ((2,), (3,), (2, 3)):
        data = encode_residual(original, values, codecs=codecs)
        np.testing.assert_array_equal(decode_residual(data, values), original)
        noisy = values + rng.uniform(-2e-4, 2e-4, values.shape).astype(np.float32)
        np.testing.assert_array_equal(decode_residual(data, noisy), original)
    # Large images use the encoders' fast settings; the format (and the decoder) is the same.
    big = np.clip(rng.normal(120, 40, (3, 450, 600)), 0, 255).astype(np.uint8)
    big_values = np.clip(big + rng.laplace(0, 0.4, big.shape), 0, 255).astype(np.float32)
    for codecs in ((2,), (3,)):
        data = encode_residual(big, big_values, codecs=codecs)
        np.testing.assert_array_equal(decode_residual(data, big_values), big)
    chosen = encode_residual(original, values)
    assert residual_codec(chosen) in ("webp-lossless", "lzma")
    with pytest.raises(ValueError, match="shape"):
        decode_residual(chosen, values[:, :-1])
    with pytest.raises(ValueError):
        decode_residual(chosen[:-8], values)
    with pytest.raises(ValueError, match="not a RAEG residual"):
        decode_residual(b"garbage" * 10, values)


# ------------------------------------------------------------------------ listing
def test_one_suffix_list_for_the_owner_tools_and_the_dataset_cache(tmp_path) -> None:
    from raeg_pl.data.cache import DatasetError, list_image_folder

    for cls, name in (("a", "x.JPG"), ("a", "deep/y.webp"), ("b", "z.ppm"), ("b", "notes.txt")):
        (tmp_path / cls / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / cls / name).write_bytes(b"")
    classes, samples = list_class_folder(tmp_path)
    assert classes == ["a", "b"]
    assert samples == [("a/deep/y.webp", 0), ("a/x.JPG", 0), ("b/z.ppm", 1)]
    assert list_image_folder(tmp_path) == (classes, samples)
    assert {".jpg", ".png", ".webp", ".tif", ".bmp", ".ppm"} <= IMAGE_SUFFIXES
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        list_image_folder(tmp_path / "empty")
