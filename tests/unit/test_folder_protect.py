"""Protect / restore / verify of real image folders, and standalone key files.

The photo folders are built from real CIFAR-10 JPEGs (upscaled and combined with Pillow)
in every mode and container the folder tools accept. The key is a small
``InvertibleProtector(3, 2, 1, 8)`` with random weight noise, so it is far from the
identity yet restores 8-bit images well (the tests check both).

Unreadable files: tests run as root, where ``chmod 000`` does not stop reading, so an
unreadable file is simulated by making the one function that reads inputs raise
``PermissionError`` for it (monkeypatch), plus a dangling symlink, which no user can read.
"""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raeg_pl.io import protect as protect_mod
from raeg_pl.io.commands import main as commands_main
from raeg_pl.io.keyfile import KeyFileError, export_key, load_key, save_key
from raeg_pl.io.manifest import JOURNAL, MANIFEST
from raeg_pl.io.protect import protect_folder
from raeg_pl.io.reader import decode_image, pixel_sha256, plan_output_names
from raeg_pl.io.restore import restore_folder
from raeg_pl.io.sidecar import decode_residual, encode_residual
from raeg_pl.io.verify import verify_store as verify_folder_against_manifest
from raeg_pl.io.writer import TMP_PREFIX, TMP_SUFFIX
from raeg_pl.models.protector import InvertibleProtector
from raeg_pl.utils.files import sha256_bytes, sha256_file

CLASSES = ("airplane", "cat", "ship", "frog", "truck", "horse")


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # Another job shares this machine's CPUs: keep every test single-threaded.
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------- helpers
def _make_net(seed: int, scale: float = 0.004) -> InvertibleProtector:
    """A protector far from the identity (perturbed weights) that still restores well."""
    net = InvertibleProtector(3, 2, 1, 8)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return net.eval()


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keys")
    save_key(_make_net(0), root / "owner.raegkey")
    save_key(_make_net(1), root / "other.raegkey")
    return {"owner": root / "owner.raegkey", "other": root / "other.raegkey"}


def _tree_state(root: Path) -> dict[str, tuple]:
    """Every entry under root (and root itself): type, mode, mtime and content hash."""
    state: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            path = Path(dirpath) / name
            st = os.lstat(path)
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                state[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                state[rel] = ("dir", st.st_mode, st.st_mtime_ns)
            else:
                state[rel] = ("file", st.st_mode, st.st_mtime_ns, sha256_file(path))
    return state


def _cifar(data_root: Path, n: int, split: str = "test") -> list[Path]:
    """n real CIFAR-10 JPEGs spread over several classes."""
    files: list[Path] = []
    per = -(-n // len(CLASSES))
    for cls in CLASSES:
        files += sorted((data_root / "cifar10" / split / cls).iterdir())[:per]
    return files[:n]


def _photo(sources: list[Path], size: tuple[int, int], start: int) -> Image.Image:
    """A 2x2 mosaic of four real CIFAR-10 photos, upscaled to ``size`` (w, h)."""
    canvas = Image.new("RGB", (64, 64))
    for k in range(4):
        with Image.open(sources[(start + k) % len(sources)]) as im:
            canvas.paste(im.convert("RGB"), ((k % 2) * 32, (k // 2) * 32))
    return canvas.resize(size, Image.Resampling.BICUBIC)


def _gradient_alpha(size: tuple[int, int]) -> Image.Image:
    w, h = size
    a = (np.add.outer(np.arange(h) * 7, np.arange(w) * 3) % 256).astype(np.uint8)
    a[: h // 4, : w // 4] = 0  # fully transparent corner: its RGB must still survive
    return Image.fromarray(a, "L")


def _save(im: Image.Image, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kwargs)


@pytest.fixture()
def photo_folder(data_root: Path, tmp_path: Path) -> Path:
    """Real photos in every supported mode/container, odd sizes, nested folders."""
    src = _cifar(data_root, 12)
    root = tmp_path / "photos"
    _save(_photo(src, (37, 53), 0), root / "odd_37x53.jpg", quality=92)
    _save(_photo(src, (100, 64), 1), root / "wide_100x64.png")
    _save(_photo(src, (48, 40), 2).convert("L"), root / "grey" / "grey.png")
    rgba = _photo(src, (45, 33), 3).convert("RGBA")
    rgba.putalpha(_gradient_alpha((45, 33)))
    _save(rgba, root / "alpha" / "rgba.png")
    la = _photo(src, (32, 30), 4).convert("L").convert("LA")
    la.putalpha(_gradient_alpha((32, 30)))
    _save(la, root / "alpha" / "grey_alpha.png")
    _save(_photo(src, (50, 50), 5).quantize(64), root / "palette" / "p.png")
    pal_t = _photo(src, (30, 34), 6).quantize(16)
    _save(pal_t, root / "palette" / "p_transparent.png", transparency=0)
    grey16 = np.asarray(_photo(src, (40, 36), 7).convert("L"), dtype=np.uint16) * 257
    grey16 = grey16 + np.arange(36, dtype=np.uint16)[:, None]  # use the low byte as well
    _save(Image.fromarray(grey16), root / "deep" / "a" / "b" / "sixteen.png")
    _save(_photo(src, (64, 48), 8).convert("CMYK"), root / "cmyk.jpg", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise
    _save(_photo(src, (60, 40), 9), root / "camera" / "rotated.jpg", quality=92, exif=exif)
    _save(_photo(src, (33, 31), 10), root / "bitmap.bmp")
    _save(_photo(src, (64, 64), 11), root / "scan.tif")
    _save(_photo(src, (70, 50), 0), root / "web" / "pic.webp", quality=90)
    # Two inputs with the same stem: a.png keeps dup.png, dup.jpg becomes dup.jpg.png.
    _save(_photo(src, (36, 36), 1), root / "dup.jpg", quality=92)
    _save(_photo(src, (36, 36), 2), root / "dup.png")
    (root / "notes.txt").write_text("labels live elsewhere\n")
    return root


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _read_rgba(path: Path) -> tuple[np.ndarray, np.ndarray | None, str]:
    with Image.open(path) as im:
        mode, arr = im.mode, np.asarray(im)
    return arr[:, :, :3], (arr[:, :, 3] if mode == "RGBA" else None), mode


# ----------------------------------------------------------------------------- key files
def test_key_file_round_trip_and_checkpoint_export(tmp_path):
    net = _make_net(3)
    fingerprint = save_key(net, tmp_path / "k.raegkey")
    loaded = load_key(tmp_path / "k.raegkey")
    assert not loaded.training and loaded.fingerprint() == fingerprint == net.fingerprint()
    x = torch.rand(1, 3, 19, 22)
    torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)

    # A ProtectorLitModule-style checkpoint: other modules' weights, hyperparameters.
    ckpt = {
        "protector_config": net.config,
        "protector_fingerprint": fingerprint,
        "state_dict": {
            **{f"protector.{k}": v for k, v in net.state_dict().items()},
            "surrogate.fc.weight": torch.zeros(2, 2),
        },
        "hyper_parameters": {"lr": 1e-3},
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    assert export_key(tmp_path / "last.ckpt", tmp_path / "from_ckpt.raegkey") == fingerprint
    assert load_key(tmp_path / "from_ckpt.raegkey").fingerprint() == fingerprint
    assert export_key(tmp_path / "k.raegkey", tmp_path / "again.raegkey") == fingerprint
    with pytest.raises(KeyFileError, match=r"last\.ckpt.*export-key"):
        load_key(tmp_path / "last.ckpt")


def test_bad_key_files_are_refused_by_name(tmp_path):
    (tmp_path / "junk.raegkey").write_bytes(b"definitely not a key")
    with pytest.raises(KeyFileError, match="junk.raegkey"):
        load_key(tmp_path / "junk.raegkey")
    with pytest.raises(KeyFileError, match="gone.raegkey"):
        load_key(tmp_path / "gone.raegkey")
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(KeyFileError, match="other.pt"):
        load_key(tmp_path / "other.pt")
    # Weights edited after export: the stored fingerprint no longer matches.
    save_key(_make_net(4), tmp_path / "k.raegkey")
    blob = torch.load(tmp_path / "k.raegkey", weights_only=True)
    name = next(iter(blob["state_dict"]))
    blob["state_dict"][name] = blob["state_dict"][name] + 1e-3
    torch.save(blob, tmp_path / "edited.raegkey")
    with pytest.raises(KeyFileError, match="fingerprint mismatch"):
        load_key(tmp_path / "edited.raegkey")
    assert (
        commands_main(
            [
                "export-key",
                "--checkpoint",
                str(tmp_path / "junk.raegkey"),
                "--out",
                str(tmp_path / "x.raegkey"),
            ]
        )
        == 2
    )
    assert not (tmp_path / "x.raegkey").exists()


def test_key_and_folder_tools_do_not_import_lightning(tmp_path):
    save_key(_make_net(5), tmp_path / "k.raegkey")
    code = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from raeg_pl.io.keyfile import load_key\n"
        "import raeg_pl.io.protect, raeg_pl.io.restore, raeg_pl.io.verify, raeg_pl.io.commands\n"
        f"load_key({str(tmp_path / 'k.raegkey')!r})\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ------------------------------------------------------------------------ residual coding
def test_residual_coding_is_exact_and_tolerates_float_noise():
    rng = np.random.default_rng(0)
    original = rng.integers(0, 256, (3, 21, 17)).astype(np.uint8)
    values = np.clip(original + rng.normal(0, 2.0, original.shape), 0, 255).astype(np.float32)
    # Put some values right on rounding boundaries, where float noise flips plain rounding.
    values.reshape(-1)[::7] = np.floor(values.reshape(-1)[::7]) + 0.5 + 1e-4
    data = encode_residual(original, values)
    np.testing.assert_array_equal(decode_residual(data, values), original)
    # Restore on other hardware: values differ by far less than the margin (1/1024 level).
    noisy = values + rng.uniform(-2e-4, 2e-4, values.shape).astype(np.float32)
    assert (np.round(noisy) != np.round(values)).any(), "the noise must flip plain rounding"
    np.testing.assert_array_equal(decode_residual(data, noisy), original)
    with pytest.raises(ValueError):
        decode_residual(data, values[:, :-1])
    with pytest.raises(ValueError):
        decode_residual(b"garbage" * 10, values)


def test_output_names_are_deterministic_on_collisions():
    rels = ["a.jpg", "a.png", "b/c.JPG", "b/c.jpeg", "d.PNG", "e.tif"]
    names, failures = plan_output_names(rels)
    assert names == {
        "a.png": "a.png",
        "a.jpg": "a.jpg.png",
        "b/c.JPG": "b/c.JPG.png",
        "b/c.jpeg": "b/c.jpeg.png",
        "d.PNG": "d.png",
        "e.tif": "e.png",
    }
    assert not failures
    assert plan_output_names(list(reversed(rels)))[0] == names
    # a.jpg's fallback name is taken by a real input: a.jpg is reported, not overwritten.
    names, failures = plan_output_names(["a.jpg", "a.png", "a.jpg.png"])
    assert names == {"a.png": "a.png", "a.jpg.png": "a.jpg.png"}
    assert "a.jpg" in failures


# ---------------------------------------------------------------------------- round trip
@pytest.mark.data
def test_round_trip_every_mode(photo_folder, keys, tmp_path):
    before = _tree_state(photo_folder)
    out, rec, exact = tmp_path / "out", tmp_path / "rec", tmp_path / "exact"
    # tile=64 sends the 100x64 and 70x50 photos through the tiled path as well.
    summary = protect_folder(
        keys["owner"], photo_folder, out, batch_size=4, lossless=True, progress=False, tile=64
    )
    assert summary.ok, summary.report()
    assert summary.ignored == ["notes.txt"]
    sidecar = tmp_path / "out.sidecar"
    assert sidecar.is_dir() and summary.sidecar_bits_per_pixel > 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["kind"] == "protected" and manifest["lossless"]
    assert manifest["key_fingerprint"] == load_key(keys["owner"]).fingerprint()
    assert manifest["tool_version"] and manifest["sidecar_bits_per_pixel"] > 0
    files = manifest["files"]
    sources = {e["source"]: rel for rel, e in files.items()}
    assert len(files) == 15
    assert sources["dup.png"] == "dup.png" and sources["dup.jpg"] == "dup.jpg.png"
    assert sources["deep/a/b/sixteen.png"] == "deep/a/b/sixteen.png"
    assert not any(p.name.startswith(TMP_PREFIX) for p in out.rglob("*"))
    assert not (out / JOURNAL).exists()

    # Conversions are recorded per file.
    conv = {e["source"]: " | ".join(e["conversions"]) for e in files.values()}
    assert "grey replicated" in conv["grey/grey.png"]
    assert "16-bit" in conv["deep/a/b/sixteen.png"]
    assert "CMYK -> RGB" in conv["cmyk.jpg"]
    assert "EXIF orientation 6" in conv["camera/rotated.jpg"]
    assert "RGBA" in conv["palette/p_transparent.png"] and "P -> RGB" in conv["palette/p.png"]
    assert "LA -> RGBA" in conv["alpha/grey_alpha.png"]
    rotated = files[sources["camera/rotated.jpg"]]
    assert (rotated["width"], rotated["height"]) == (40, 60)

    restored = restore_folder(keys["owner"], out, rec, batch_size=4, progress=False)
    assert restored.ok, restored.report()
    lossless = restore_folder(keys["owner"], out, exact, sidecar_dir=sidecar, progress=False)
    assert lossless.ok and lossless.exact == 15, lossless.report()
    assert json.loads((rec / MANIFEST).read_text())["kind"] == "recovered"

    for rel, entry in files.items():
        data = (photo_folder / entry["source"]).read_bytes()
        ref = decode_image(data)
        assert entry["source_sha256"] == sha256_bytes(data)
        assert entry["source_pixel_sha256"] == pixel_sha256(ref.rgb, ref.alpha)
        prot_rgb, prot_alpha, prot_mode = _read_rgba(out / rel)
        rec_rgb, rec_alpha, rec_mode = _read_rgba(rec / rel)
        ex_rgb, ex_alpha, _ = _read_rgba(exact / rel)
        assert prot_mode == rec_mode == entry["mode"] == ("RGB" if ref.alpha is None else "RGBA")
        assert prot_rgb.shape == rec_rgb.shape == ref.rgb.shape
        # The protector really changed the image, and restore undid it.
        assert _psnr(prot_rgb, ref.rgb) < 45, rel
        assert _psnr(rec_rgb, ref.rgb) > 35, (rel, _psnr(rec_rgb, ref.rgb))
        if ref.alpha is not None:
            np.testing.assert_array_equal(prot_alpha, ref.alpha)
            np.testing.assert_array_equal(rec_alpha, ref.alpha)
            np.testing.assert_array_equal(ex_alpha, ref.alpha)
        np.testing.assert_array_equal(ex_rgb, ref.rgb)
        assert pixel_sha256(ex_rgb, ex_alpha) == entry["source_pixel_sha256"]
        assert entry["sidecar"]["bits_per_pixel"] > 0

    grey = decode_image((photo_folder / "deep/a/b/sixteen.png").read_bytes())
    with Image.open(photo_folder / "deep/a/b/sixteen.png") as im:
        raw16 = np.asarray(im).astype(np.int64)
    np.testing.assert_array_equal(grey.rgb[:, :, 0], (raw16 * 255 + 32767) // 65535)
    # The references above come from decode_image: pin a few conversions independently.
    with Image.open(photo_folder / "grey" / "grey.png") as im:
        plain_grey = np.asarray(im)
    for c in range(3):
        np.testing.assert_array_equal(
            _read_rgba(exact / "grey" / "grey.png")[0][..., c], plain_grey
        )
    with Image.open(photo_folder / "camera" / "rotated.jpg") as im:
        upright = np.asarray(im.convert("RGB").transpose(Image.Transpose.ROTATE_270))
    np.testing.assert_array_equal(_read_rgba(exact / "camera" / "rotated.png")[0], upright)
    with Image.open(photo_folder / "alpha" / "rgba.png") as im:
        np.testing.assert_array_equal(
            _read_rgba(exact / "alpha" / "rgba.png")[1], np.asarray(im)[..., 3]
        )

    for folder, sc in ((out, sidecar), (rec, None), (exact, None)):
        assert (
            commands_main(
                ["verify", "--input", str(folder)] + (["--sidecar", str(sc)] if sc else [])
            )
            == 0
        )
    assert _tree_state(photo_folder) == before


# ---------------------------------------------------------------------- unreadable inputs
@pytest.mark.data
def test_unreadable_inputs_are_reported_and_the_rest_processed(
    data_root, keys, tmp_path, monkeypatch, capsys
):
    src = _cifar(data_root, 4)
    root = tmp_path / "in"
    for i, f in enumerate(src):
        _save(Image.open(f), root / "good" / f"{i}.png")
    jpg = io.BytesIO()
    _photo(src, (64, 64), 0).save(jpg, "JPEG", quality=90)
    jpg = jpg.getvalue()
    sos = jpg.index(b"\xff\xda")
    rng = np.random.default_rng(0)
    (root / "bad").mkdir()
    (root / "bad" / "corrupt.jpg").write_bytes(
        jpg[: sos + 14] + rng.integers(0, 256, 800, dtype=np.uint8).tobytes()
    )
    png = (root / "good" / "0.png").read_bytes()
    (root / "bad" / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "bad" / "empty.png").write_bytes(b"")
    (root / "bad" / "text.jpg").write_text("this is a text file, not a JPEG\n")
    (root / "bad" / "secret.png").write_bytes(png)
    (root / "bad" / "dangling.png").symlink_to(root / "nowhere.png")
    before = _tree_state(root)

    real_read = protect_mod.read_source_bytes

    def read(path: Path) -> bytes:
        if path.name == "secret.png":  # root ignores chmod 000: simulate it
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path)

    monkeypatch.setattr(protect_mod, "read_source_bytes", read)
    rc = commands_main(
        [
            "protect",
            "--key",
            str(keys["owner"]),
            "--input",
            str(root),
            "--output",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 1
    expected = {
        "bad/corrupt.jpg": "broken data stream",
        "bad/truncated.png": "truncated",
        "bad/empty.png": "empty file",
        "bad/text.jpg": "not a recognised image",
        "bad/secret.png": "Permission denied",
        "bad/dangling.png": "cannot read",
    }
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert set(manifest["failed"]) == set(expected)
    for rel, reason in expected.items():
        assert reason in manifest["failed"][rel], (rel, manifest["failed"][rel])
        assert f"{rel}: " in printed and reason in printed
    assert sorted(manifest["files"]) == [f"good/{i}.png" for i in range(4)]
    assert not (tmp_path / "out" / "bad").exists()
    assert _tree_state(root) == before


# ----------------------------------------------------------------------- restore checks
@pytest.mark.data
def test_wrong_key_is_refused_before_writing(photo_folder, keys, tmp_path, capsys):
    out = tmp_path / "out"
    assert protect_folder(keys["owner"], photo_folder, out, lossless=True, progress=False).ok
    before, out_before = _tree_state(photo_folder), _tree_state(out)
    rc = commands_main(
        [
            "restore",
            "--key",
            str(keys["other"]),
            "--input",
            str(out),
            "--output",
            str(tmp_path / "rec"),
            "--no-progress",
        ]
    )
    assert rc == 2 and "wrong key" in capsys.readouterr().err
    assert not (tmp_path / "rec").exists()
    (tmp_path / "rec2").mkdir()
    rc = commands_main(
        [
            "restore",
            "--key",
            str(keys["other"]),
            "--input",
            str(out),
            "--output",
            str(tmp_path / "rec2"),
            "--sidecar",
            str(tmp_path / "out.sidecar"),
        ]
    )
    assert rc == 2 and not any((tmp_path / "rec2").iterdir())
    # Protecting more into a folder made with another key is refused as well.
    rc = commands_main(
        ["protect", "--key", str(keys["other"]), "--input", str(photo_folder), "--output", str(out)]
    )
    assert rc == 2
    assert _tree_state(out) == out_before and _tree_state(photo_folder) == before


@pytest.mark.data
def test_tampered_missing_and_extra_files_are_named(photo_folder, keys, tmp_path, capsys):
    out, rec = tmp_path / "out", tmp_path / "rec"
    assert protect_folder(keys["owner"], photo_folder, out, lossless=True, progress=False).ok
    before = _tree_state(photo_folder)
    with Image.open(out / "grey" / "grey.png") as im:
        arr = np.asarray(im).copy()
    arr[3, 5, 0] ^= 1  # one bit of one pixel
    Image.fromarray(arr).save(out / "grey" / "grey.png")
    (out / "bitmap.png").unlink()
    Image.fromarray(arr).save(out / "planted.png")
    capsys.readouterr()

    rc = commands_main(
        [
            "restore",
            "--key",
            str(keys["owner"]),
            "--input",
            str(out),
            "--output",
            str(rec),
            "--no-progress",
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 1
    assert "MODIFIED" in printed and "grey/grey.png" in printed
    assert "MISSING" in printed and "bitmap.png" in printed
    assert "EXTRA" in printed and "planted.png" in printed
    manifest = json.loads((rec / MANIFEST).read_text())
    assert manifest["modified"] == ["grey/grey.png"] and manifest["missing"] == ["bitmap.png"]
    assert manifest["extra"] == ["planted.png"]
    assert len(manifest["files"]) == 13 and not (rec / "grey" / "grey.png").exists()

    rc = commands_main(["verify", "--input", str(out)])
    printed = capsys.readouterr().out
    assert rc == 1 and "grey/grey.png" in printed and "bitmap.png" in printed

    # A damaged sidecar is caught too: that file fails, the others are restored exactly.
    sc = tmp_path / "out.sidecar" / "cmyk.png.res"
    sc.write_bytes(sc.read_bytes()[:-3] + b"xyz")
    summary = restore_folder(
        keys["owner"],
        out,
        tmp_path / "exact",
        sidecar_dir=tmp_path / "out.sidecar",
        progress=False,
    )
    assert "cmyk.png" in summary.failed and summary.exact == 12
    assert not summary.ok and _tree_state(photo_folder) == before


# ------------------------------------------------------------------------------ refusals
@pytest.mark.data
def test_overlapping_folders_are_refused(photo_folder, keys, tmp_path, capsys):
    before = _tree_state(photo_folder)
    key = str(keys["owner"])
    cases = [
        ["--output", str(photo_folder)],
        ["--output", str(photo_folder / "protected")],
        ["--output", str(photo_folder / "grey" / "p")],
        ["--output", str(photo_folder.parent)],  # the input is inside the output
        ["--output", str(tmp_path / "o"), "--sidecar", str(tmp_path / "o" / "sc")],
        ["--output", str(tmp_path / "o"), "--sidecar", str(photo_folder / "sc")],
    ]
    for extra in cases:
        rc = commands_main(["protect", "--key", key, "--input", str(photo_folder), *extra])
        assert rc == 2, extra
        assert "error" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert _tree_state(photo_folder) == before


@pytest.mark.data
def test_foreign_files_in_output_are_never_overwritten(photo_folder, keys, tmp_path):
    before = _tree_state(photo_folder)
    out = tmp_path / "out"
    out.mkdir()
    (out / "bitmap.png").write_bytes(b"the user's own file")
    summary = protect_folder(keys["owner"], photo_folder, out, progress=False)
    assert (
        set(summary.failed) == {"bitmap.bmp"}
        and "not written by raeg" in summary.failed["bitmap.bmp"]
    )
    assert (out / "bitmap.png").read_bytes() == b"the user's own file"
    assert len(summary.written) == 14
    # A rerun does not redo anything and still refuses the foreign file.
    again = protect_folder(keys["owner"], photo_folder, out, progress=False)
    assert set(again.failed) == {"bitmap.bmp"} and len(again.skipped) == 14 and not again.written
    assert _tree_state(photo_folder) == before


# ----------------------------------------------------------------------------- resume
def _journal_done(out: Path) -> list[str]:
    done = []
    for line in (out / JOURNAL).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("op") == "done":
            done.append(rec["file"])
    return done


@pytest.mark.data
def test_killed_protect_resumes_without_redoing_work(data_root, keys, tmp_path):
    root = tmp_path / "in"
    for i, f in enumerate(_cifar(data_root, 40)):
        _save(Image.open(f), root / f.parent.name / f"{i:02d}_{f.name}")
    before = _tree_state(root)
    out = tmp_path / "out"
    env = {**os.environ, "RAEG_TEST_SLOW_MS": "150", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "raeg_pl.cli",
        "protect",
        "--key",
        str(keys["owner"]),
        "--input",
        str(root),
        "--output",
        str(out),
        "--batch-size",
        "4",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / JOURNAL).exists() and len(_journal_done(out)) >= 6:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"protect ended before the kill: {proc.communicate()}"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert not (out / MANIFEST).exists(), "a killed run must not look complete"
    done_before = _journal_done(out)
    assert 6 <= len(done_before) < 40
    stamps = {
        rel: (os.stat(out / rel).st_mtime_ns, os.stat(out / rel).st_ino) for rel in done_before
    }
    # A temporary file as a kill mid-write leaves it: it must not be taken for output.
    (out / f"{TMP_PREFIX}cat-0001.png.x1y2{TMP_SUFFIX}").write_bytes(b"half a PNG")
    assert commands_main(["verify", "--input", str(out)]) == 2  # unfinished: no manifest

    summary = protect_folder(keys["owner"], root, out, batch_size=4, progress=False)
    assert summary.ok, summary.report()
    manifest = json.loads((out / MANIFEST).read_text())
    by_source = {e["source"]: rel for rel, e in manifest["files"].items()}
    assert len(manifest["files"]) == 40
    assert sorted(by_source[s] for s in summary.skipped) == sorted(done_before)
    assert not set(summary.skipped) & set(summary.written)
    assert len(summary.skipped) + len(summary.written) == 40
    assert summary.removed_temp_files >= 1
    for rel, stamp in stamps.items():  # finished before the kill: not rewritten
        assert (os.stat(out / rel).st_mtime_ns, os.stat(out / rel).st_ino) == stamp
    leftovers = [p for p in out.rglob("*") if p.name.startswith(TMP_PREFIX) or p.name == JOURNAL]
    assert not leftovers
    assert verify_folder_against_manifest(out).ok
    assert _tree_state(root) == before
