"""Owner commands with a label-conditioned key: labels from class folders or a CSV file,
labels recorded in the manifest and the PNG, tampering found by name, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raeg_pl.io.commands import main as commands_main
from raeg_pl.io.keyfile import read_key, save_key
from raeg_pl.io.manifest import MANIFEST, FolderError
from raeg_pl.io.protect import protect_folder
from raeg_pl.io.reader import LABEL_CHUNK, decode_image
from raeg_pl.io.restore import restore_folder
from raeg_pl.io.verify import verify_store
from raeg_pl.models.protector import InvertibleProtector

CLASSES = ["cat", "dog", "frog"]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> Path:
    net = InvertibleProtector(levels=2, blocks_per_level=1, hidden_channels=8, num_classes=3)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.004)
    path = tmp_path_factory.mktemp("key") / "cond.raegkey"
    save_key(net.eval(), path, classes=CLASSES)
    return path


def _image(seed: int, size: tuple[int, int] = (20, 16)) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(20, 220, w)[None, :, None] + np.linspace(0, 30, h)[:, None, None]
    return Image.fromarray(np.clip(ramp + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.fixture()
def class_folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for i, rel in enumerate(["cat/a.png", "cat/sub/b.jpg", "dog/c.png", "frog/d.png"]):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        _image(i).save(root / rel)
    return root


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


def test_conditioned_key_protects_class_folders_and_restores_bit_exact(key, class_folder, tmp_path):
    out = tmp_path / "out"
    summary = protect_folder(key, class_folder, out, lossless=True, progress=False, batch_size=3)
    assert summary.ok, summary.report()
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["classes"] == CLASSES and manifest["labels_from"] == "class folders"
    labels = {rel: e["label"] for rel, e in manifest["files"].items()}
    assert labels == {
        "cat/a.png": "cat",
        "cat/sub/b.png": "cat",
        "dog/c.png": "dog",
        "frog/d.png": "frog",
    }
    for rel, label in labels.items():
        with Image.open(out / rel) as im:
            assert im.info[LABEL_CHUNK] == label  # inside the file: covered by its SHA-256
    assert verify_store(out).ok

    # A plain restore finds the sidecar at its default place: bit-exact.
    rec = restore_folder(key, out, tmp_path / "rec", progress=False)
    assert rec.ok and rec.exact == 4, rec.report()
    for rel, entry in manifest["files"].items():
        source = decode_image((class_folder / entry["source"]).read_bytes())
        with Image.open(tmp_path / "rec" / rel) as im:
            np.testing.assert_array_equal(np.asarray(im), source.rgb)

    # The label matters: protecting a cat as a dog gives another image.
    net = read_key(key).net
    x = torch.from_numpy(np.asarray(_image(0))).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        assert not torch.equal(net(x, torch.tensor([0])), net(x, torch.tensor([1])))


def test_moved_files_and_edited_labels_are_reported_as_tampered(
    key, class_folder, tmp_path, capsys
):
    out = tmp_path / "out"
    assert protect_folder(key, class_folder, out, progress=False).ok
    shutil.move(out / "dog" / "c.png", out / "frog" / "c.png")
    summary = verify_store(out)
    assert list(summary.tampered) == ["frog/c.png"] and not summary.ok
    assert commands_main(["verify", "--input", str(out)]) == 1
    assert "frog/c.png" in capsys.readouterr().out
    rec = restore_folder(key, out, tmp_path / "rec", progress=False)
    assert list(rec.tampered) == ["dog/c.png"] and not rec.ok
    assert not (tmp_path / "rec" / "frog" / "c.png").exists()
    assert not (tmp_path / "rec" / "dog" / "c.png").exists()
    assert (tmp_path / "rec" / "cat" / "a.png").is_file()  # the others are restored
    shutil.move(out / "frog" / "c.png", out / "dog" / "c.png")

    # The manifest edited consistently (entry and label moved): the PNG's label disagrees.
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"]["frog/c.png"] = manifest["files"].pop("dog/c.png") | {"label": "frog"}
    shutil.move(out / "dog" / "c.png", out / "frog" / "c.png")
    (out / MANIFEST).write_text(json.dumps(manifest))
    summary = verify_store(out)
    assert "embedded in the file is 'dog'" in summary.tampered["frog/c.png"]
    rec = restore_folder(key, out, tmp_path / "rec2", progress=False)
    assert (
        list(rec.tampered) == ["frog/c.png"] and not (tmp_path / "rec2" / "frog" / "c.png").exists()
    )
    # Only the manifest's label edited: the class folder disagrees.
    manifest["files"]["cat/a.png"]["label"] = "dog"
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert "class folder 'cat'" in verify_store(out).tampered["cat/a.png"]


def test_flat_folder_with_a_labels_file(key, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        _image(i).save(flat / f"{i}.png")
    (tmp_path / "labels.csv").write_text("relative_path,class\n0.png,dog\n1.png,2\n2.png,cat\n")
    rc = commands_main(
        ["protect", "--key", str(key), "--input", str(flat), "--output", str(tmp_path / "out"),
         "--labels", str(tmp_path / "labels.csv"), "--no-progress", "--lossless"]
    )  # fmt: skip
    assert rc == 0
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert {r: e["label"] for r, e in manifest["files"].items()} == {
        "0.png": "dog",
        "1.png": "frog",
        "2.png": "cat",
    }
    assert manifest["labels_from"] == "csv" and manifest["label_folder_level"] is None
    rc = commands_main(
        ["restore", "--key", str(key), "--input", str(tmp_path / "out"),
         "--output", str(tmp_path / "rec"), "--no-progress", "--json"]
    )  # fmt: skip
    assert rc == 0
    assert json.loads((tmp_path / "rec" / MANIFEST).read_text())["num_exact"] == 3


def test_a_changed_label_is_protected_again_on_resume(key, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        _image(i).save(flat / f"{i}.png")
    labels = tmp_path / "labels.csv"
    labels.write_text("0.png,cat\n1.png,dog\n2.png,frog\n")
    first = protect_folder(key, flat, tmp_path / "out", labels=labels, progress=False)
    assert sorted(first.written) == ["0.png", "1.png", "2.png"]
    before = (tmp_path / "out" / "1.png").read_bytes()
    labels.write_text("0.png,cat\n1.png,cat\n2.png,frog\n")
    again = protect_folder(key, flat, tmp_path / "out", labels=labels, progress=False)
    assert again.written == ["1.png"] and sorted(again.skipped) == ["0.png", "2.png"]
    assert (tmp_path / "out" / "1.png").read_bytes() != before
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["files"]["1.png"]["label"] == "cat"
    # Restore without a sidecar says that it is approximate, and why.
    rc = commands_main(
        ["restore", "--key", str(key), "--input", str(tmp_path / "out"),
         "--output", str(tmp_path / "rec"), "--no-progress"]
    )  # fmt: skip
    assert rc == 0
    assert "approximate restore: the folder was protected without a lossless sidecar" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize(
    ("layout", "csv", "message"),
    [
        (["a.png", "cat/b.png"], None, r"1 image\(s\) lie outside any class folder \(a\.png\)"),
        (["cat/a.png", "horse/b.png"], None, r"unknown class folder\(s\) \['horse'\]"),
        (["a.png", "b.png"], "a.png,cat\n", r"no label for 1 image\(s\) .*\(b\.png\)"),
        (["a.png"], "a.png,horse\n", r"labels\.csv:1: unknown class 'horse'"),
        (["a.png"], "a.png,7\n", r"unknown class '7'"),
        (["a.png"], "a.png,cat\nzz.png,dog\n", r"not images of .*\(zz\.png\)"),
    ],
)
def test_inputs_a_conditioned_key_cannot_label_are_refused_before_writing(
    key, tmp_path, layout, csv, message
):
    src = tmp_path / "in"
    for i, rel in enumerate(layout):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        _image(i).save(src / rel)
    labels = None
    if csv is not None:
        labels = tmp_path / "labels.csv"
        labels.write_text(csv)
    out = tmp_path / "out"
    with pytest.raises(FolderError, match=message):
        protect_folder(key, src, out, labels=labels, lossless=True, progress=False)
    assert not out.exists() and not (tmp_path / "out.sidecar").exists()


def test_unconditioned_keys_take_no_labels_and_need_no_class_folders(tmp_path):
    net = InvertibleProtector(levels=1, blocks_per_level=1, hidden_channels=4).eval()
    save_key(net, tmp_path / "plain.raegkey")
    (tmp_path / "in").mkdir()
    _image(0).save(tmp_path / "in" / "a.png")
    (tmp_path / "labels.csv").write_text("a.png,cat\n")
    with pytest.raises(FolderError, match="not conditioned on class labels"):
        protect_folder(tmp_path / "plain.raegkey", tmp_path / "in", tmp_path / "out",
                       labels=tmp_path / "labels.csv", progress=False)  # fmt: skip
    summary = protect_folder(
        tmp_path / "plain.raegkey", tmp_path / "in", tmp_path / "out", progress=False
    )
    assert summary.ok
    entry = json.loads((tmp_path / "out" / MANIFEST).read_text())["files"]["a.png"]
    assert entry["label"] is None and "label_embedded" not in entry
    rec = restore_folder(
        tmp_path / "plain.raegkey", tmp_path / "out", tmp_path / "rec", progress=False
    )
    assert rec.ok and any("without a lossless sidecar" in n for n in rec.notes)


def test_export_key_command_takes_class_names_or_a_class_folder(key, class_folder, tmp_path):
    net = read_key(key).net
    ckpt = {
        "protector_config": net.config,
        "protector_fingerprint": net.fingerprint(),
        "state_dict": {f"protector.{k}": v for k, v in net.state_dict().items()},
    }
    torch.save(ckpt, tmp_path / "p.ckpt")
    out = tmp_path / "k.raegkey"
    assert (
        commands_main(["export-key", "--checkpoint", str(tmp_path / "p.ckpt"), "--out", str(out)])
        == 2
    )
    assert not out.exists()
    args = ["export-key", "--checkpoint", str(tmp_path / "p.ckpt"), "--out", str(out)]
    assert commands_main([*args, "--classes", str(class_folder)]) == 0
    assert read_key(out).classes == tuple(CLASSES)
    assert commands_main([*args, "--classes", "x,y,z"]) == 0
    assert read_key(out).classes == ("x", "y", "z")
