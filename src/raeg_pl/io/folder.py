"""Protect, restore and verify real image folders: the dataset owner's workflow.

``protect_folder(key, IN, OUT)`` walks ``IN`` recursively and writes, for every image, an
8-bit PNG protected by the key's generator at the same relative path under ``OUT``, plus
``OUT/manifest.json``. ``restore_folder(key, OUT, REC)`` inverts a protected folder;
``verify_folder_against_manifest(DIR)`` checks any such folder against its manifest.

Inputs
    PNG, JPEG, BMP, TIFF and WebP files (by extension, case-insensitive; decoded by content).
    Other files are listed as ignored. Symlinked folders are not followed. Every input is
    brought to 8-bit RGB, plus an untouched alpha plane when it has one, and each conversion
    is recorded in the manifest entry's ``conversions``:

    * EXIF orientation is applied (``ImageOps.exif_transpose``) before anything else;
    * multi-frame files (TIFF pages, animated WebP/PNG) use their first frame;
    * ``L`` and ``1``: the grey plane is replicated to three channels and the output is
      RGB. The protector is a 3-channel network and its output channels differ, so a
      protected or restored grey image is RGB; the original is the replicated RGB image
      (that is what the source pixel hash covers);
    * ``LA``: as ``L``, plus alpha -> RGBA;
    * ``P``: -> RGBA when the palette has transparency, else -> RGB;
    * ``I;16*`` (16-bit grey) and ``I`` with values in 0..65535: ``round(v * 255 / 65535)``
      -> grey, then as ``L``; 16-bit RGB(A) PNGs are reduced to 8 bits by Pillow;
    * ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``: Pillow's ``convert("RGB")`` (no colour
      management: embedded ICC profiles are not applied, and that is recorded);
    * ``F`` (float) images are refused.

    The alpha plane is never sent through the network and is copied bit for bit into the
    RGBA output; only the RGB part is protected.

Outputs
    ``IN/a/b.jpg`` -> ``OUT/a/b.png``. When several inputs would get the same output name
    (``a.jpg`` and ``a.png``), the input whose own name is that ``.png`` name keeps it and
    every other one keeps its full name plus ``.png`` (``a.jpg`` -> ``a.jpg.png``); a name
    that still collides is reported as a failure. The rule depends only on the set of input
    names, never on their order.

    Images larger than ``tile`` (default 1024) on either side are protected tile by tile
    (tiles of ``tile x tile`` from the top-left corner; the tile size is recorded per file,
    and restore uses the same grid). Each tile is an exact bijection, so the whole image is
    too; it bounds the network's memory for large photos. ``tile=0`` processes whole images.

Safety
    Nothing is ever written inside ``IN``; ``OUT == IN``, ``OUT`` inside ``IN`` and ``IN``
    inside ``OUT`` are refused (and the same for the sidecar folder). A file in ``OUT`` that
    this tool did not create is never overwritten: its input is reported as a failure.
    Every output is written to ``.raeg-tmp-*.part`` in its folder and renamed into place.
    Names starting with ``.raeg-tmp-`` and ending in ``.part`` are reserved: they are the
    temporary files of an interrupted run and are deleted when a run starts.

Journal and resume
    ``OUT/.raeg-journal.jsonl`` records, fsynced once per batch, the outputs a batch is
    about to write (``begin``) and each finished file with its manifest entry (``done``).
    At the end the entries are folded into ``OUT/manifest.json`` (written atomically) and
    the journal is deleted. A rerun after an interruption skips every input whose journal or
    manifest entry matches its source hash and whose output still has the recorded hash,
    and redoes the rest; an output named in a ``begin`` record but never ``done`` is known
    to be this tool's and may be overwritten. A lock on the journal refuses two concurrent
    runs on one ``OUT``. A folder with ``manifest.json`` and no journal is complete.

Lossless sidecar
    With ``lossless=True`` every protected image also gets a residual file
    ``SIDECAR/<output>.res`` (default ``SIDECAR = OUT.sidecar``, outside ``OUT``: only
    authorised users receive it) with which restore reproduces the original 8-bit pixels
    bit for bit; see :func:`encode_residual` for the coding. The manifest records each
    sidecar's size in bits per pixel. Restore checks the result against the source pixel
    hash.

The pixel hashes in a manifest (``source_pixel_sha256``) are SHA-256 digests of the
original pixels: they reveal nothing beyond letting someone who already holds a candidate
image confirm it is the original.
"""

from __future__ import annotations

import bz2
import contextlib
import hashlib
import io
import json
import os
import struct
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

import raeg_pl
from raeg_pl.models.protector import InvertibleProtector
from raeg_pl.utils.files import sha256_bytes, sha256_file, write_atomic

try:  # POSIX only; without it concurrent runs on one OUT are not detected
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_TILE",
    "IMAGE_SUFFIXES",
    "JOURNAL",
    "LOSSLESS_MARGIN",
    "MANIFEST",
    "DecodedImage",
    "FolderError",
    "FolderSummary",
    "ImageDecodeError",
    "KeyMismatchError",
    "decode_image",
    "decode_residual",
    "encode_residual",
    "list_images",
    "pixel_sha256",
    "plan_output_names",
    "protect_folder",
    "restore_folder",
    "sha256_bytes",
    "sha256_file",
    "verify_folder_against_manifest",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".tif", ".tiff", ".webp"})
_PIL_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")  # JPEG includes multi-picture (MPO)
MANIFEST = "manifest.json"
JOURNAL = ".raeg-journal.jsonl"
SIDECAR_INDEX = "sidecar.json"
SIDECAR_SUFFIX = ".res"
TMP_PREFIX = ".raeg-tmp-"
TMP_SUFFIX = ".part"
FOLDER_FORMAT = "raeg-folder"
FOLDER_FORMAT_VERSION = 1
DEFAULT_TILE = 1024
DEFAULT_MAX_BATCH_PIXELS = 1 << 22  # 4 Mpx of pending decoded images per batch
# Half-width, in 8-bit levels, of the band around each rounding boundary inside which the
# lossless coder does not trust rounding to be reproducible (see encode_residual).
LOSSLESS_MARGIN = 1.0 / 1024
SLOW_ENV = "RAEG_TEST_SLOW_MS"  # test hook: sleep this many ms after each protected file
_RESIDUAL_MAGIC = b"RRS1"
_RESIDUAL_HEADER = struct.Struct("<4sBIIIdI")
# Residual codecs by id (the id is stored in each sidecar file): (compress, decompress).
_CODECS = (
    (lambda b: zlib.compress(b, 9), zlib.decompress),
    (lambda b: bz2.compress(b, 9), bz2.decompress),
)


class FolderError(ValueError):
    """A refused request (bad paths, wrong key, foreign or unfinished folder); nothing done."""


class KeyMismatchError(FolderError):
    """The key's fingerprint is not the one a protected folder was made with."""


class ImageDecodeError(ValueError):
    """An input file could not be decoded into an 8-bit image."""


# ---------------------------------------------------------------------------- summaries
@dataclass
class FolderSummary:
    """Outcome of one protect / restore / verify call.

    Paths are relative to the folder named in ``input_dir`` (inputs, and for restore and
    verify the protected or checked files).
    """

    kind: str
    input_dir: str
    output_dir: str | None = None
    sidecar_dir: str | None = None
    total: int = 0
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    ok_files: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    removed_temp_files: int = 0
    exact: int | None = None
    sidecar_bytes: int | None = None
    sidecar_bits_per_pixel: float | None = None
    seconds: float = 0.0
    images_per_s: float = 0.0
    manifest: str | None = None

    @property
    def ok(self) -> bool:
        """True when nothing failed, and no file was missing, modified or extra."""
        return not (self.failed or self.missing or self.modified or self.extra)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}

    def report(self, limit: int = 50) -> str:
        """Human-readable summary; lists are cut at ``limit`` names each."""
        lines = [
            f"{self.kind}: {self.input_dir}" + (f" -> {self.output_dir}" if self.output_dir else "")
        ]
        counts = [f"{self.total} images"]
        if self.kind in ("protect", "restore"):
            counts += [f"{len(self.written)} written", f"{len(self.skipped)} already done"]
        else:
            counts.append(f"{len(self.ok_files)} ok")
        counts += [
            f"{len(self.failed)} failed",
            f"{len(self.missing)} missing",
            f"{len(self.modified)} modified",
            f"{len(self.extra)} extra",
        ]
        lines.append("  " + ", ".join(counts))
        if self.written:
            lines.append(f"  {self.images_per_s:.1f} img/s ({self.seconds:.1f} s)")
        if self.exact is not None:
            lines.append(f"  {self.exact} restored bit-exact (pixel hash = source pixel hash)")
        if self.sidecar_bits_per_pixel is not None:
            lines.append(
                f"  lossless sidecar: {self.sidecar_bytes} bytes, "
                f"{self.sidecar_bits_per_pixel:.3f} bits/pixel ({self.sidecar_dir})"
            )
        if self.ignored:
            lines.append(f"  {len(self.ignored)} non-image files ignored")
        if self.removed_temp_files:
            lines.append(f"  removed {self.removed_temp_files} temporary files of an earlier run")

        def block(title: str, names: list[str], reasons: dict[str, str] | None = None) -> None:
            if not names:
                return
            lines.append(f"  {title}:")
            for name in names[:limit]:
                lines.append(f"    {name}" + (f": {reasons[name]}" if reasons else ""))
            if len(names) > limit:
                lines.append(f"    ... and {len(names) - limit} more")

        block("FAILED", sorted(self.failed), self.failed)
        block("MISSING", self.missing)
        block("MODIFIED (hash mismatch)", self.modified)
        block("EXTRA (not in manifest)", self.extra)
        lines.append("  OK" if self.ok else "  NOT OK")
        return "\n".join(lines)


# -------------------------------------------------------------------------------- paths
def _resolve(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _check_apart(a: Path, b: Path, name_a: str, name_b: str) -> None:
    """Refuses ``a == b``, ``a`` inside ``b`` and ``b`` inside ``a`` (resolved paths)."""
    if a == b:
        raise FolderError(f"{name_a} and {name_b} are the same folder: {a}")
    if a.is_relative_to(b):
        raise FolderError(f"{name_a} {a} is inside {name_b} {b}")
    if b.is_relative_to(a):
        raise FolderError(f"{name_b} {b} is inside {name_a} {a}")


def _check_layout(
    input_dir: Path, output_dir: Path, sidecar_dir: Path | None, in_name: str = "input"
) -> None:
    if not input_dir.is_dir():
        raise FolderError(f"{in_name} folder not found: {input_dir}")
    for name, path in (("output", output_dir), ("sidecar", sidecar_dir)):
        if path is not None and path.exists() and not path.is_dir():
            raise FolderError(f"{name} {path} exists and is not a folder")
    _check_apart(input_dir, output_dir, in_name, "output")
    if sidecar_dir is not None:
        _check_apart(input_dir, sidecar_dir, in_name, "sidecar")
        _check_apart(output_dir, sidecar_dir, "output", "sidecar")


def _walk_files(root: Path) -> Iterator[str]:
    """Relative POSIX paths of all non-directory entries under ``root``, sorted, no symlinked dirs."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(filenames):
            yield (base / name).relative_to(root).as_posix()


def list_images(input_dir: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Image files under ``input_dir`` by extension, and the other (ignored) files.

    Returns:
        (images, ignored): sorted relative POSIX paths.
    """
    images, ignored = [], []
    for rel in _walk_files(Path(input_dir)):
        (images if PurePosixPath(rel).suffix.lower() in IMAGE_SUFFIXES else ignored).append(rel)
    return images, ignored


def plan_output_names(rels: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Output PNG names for input relative paths (see the module docstring for the rule).

    Returns:
        (names, failures): ``names[input] = output``; ``failures[input] = reason`` for inputs
        whose name still collides after the rule.
    """
    by_base: dict[str, list[str]] = defaultdict(list)
    for rel in rels:
        by_base[str(PurePosixPath(rel).with_suffix(".png"))].append(rel)
    names: dict[str, str] = {}
    for base, members in by_base.items():
        for rel in members:
            names[rel] = base if len(members) == 1 or rel == base else rel + ".png"
    owners: dict[str, list[str]] = defaultdict(list)
    for rel, out in names.items():
        owners[out].append(rel)
    failures: dict[str, str] = {}
    for out, members in owners.items():
        if len(members) > 1:
            # An input literally named like the output keeps it; the others cannot be placed.
            keep = out if out in members else None
            for rel in members:
                if rel != keep:
                    others = ", ".join(sorted(m for m in members if m != rel))
                    failures[rel] = f"output name {out} collides with input(s) {others}"
                    del names[rel]
    return names, failures


# ----------------------------------------------------------------------------- decoding
@dataclass
class DecodedImage:
    """An input image brought to 8 bits.

    Attributes:
        rgb: (H, W, 3) uint8.
        alpha: (H, W) uint8 alpha plane, or None.
        conversions: what was done to get here, in order (for the manifest).
        source_format: Pillow's format name (``JPEG``, ``PNG``...).
        source_mode: Pillow mode of the file (``RGB``, ``L``, ``CMYK``, ``I;16``...).
    """

    rgb: np.ndarray
    alpha: np.ndarray | None
    conversions: list[str]
    source_format: str
    source_mode: str


def pixel_sha256(rgb: np.ndarray, alpha: np.ndarray | None = None) -> str:
    """SHA-256 of 8-bit pixels: (H, W, 3) uint8 RGB plus an optional (H, W) alpha plane.

    The shape is hashed too, so images with the same bytes but other sizes differ.
    """
    arr = rgb if alpha is None else np.dstack([rgb, alpha])
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    h = hashlib.sha256(f"raeg-pixels/1 {arr.shape[0]}x{arr.shape[1]}x{arr.shape[2]}\n".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def _rawmode(im: Image.Image) -> str:
    try:
        args = im.tile[0][3]
    except (IndexError, TypeError, AttributeError):
        return ""
    raw = args if isinstance(args, str) else (args[0] if args else "")
    return raw if isinstance(raw, str) else ""


def _grey_to_rgb(grey: np.ndarray, conversions: list[str]) -> np.ndarray:
    conversions.append("grey replicated to RGB")
    return np.repeat(grey[:, :, None], 3, axis=2)


def _to_rgb_alpha(
    im: Image.Image, rawmode: str, conversions: list[str]
) -> tuple[np.ndarray, np.ndarray | None]:
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
            raise ImageDecodeError(f"mode {mode}: values outside 0..65535 are not supported")
        grey = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        conversions.append(f"{mode} 16-bit -> 8-bit (round(v*255/65535))")
        return _grey_to_rgb(grey, conversions), None
    if mode == "F":
        raise ImageDecodeError("floating-point images (mode F) are not supported")
    if mode in ("1", "L"):
        if mode == "1":
            conversions.append("1 -> L")
        return _grey_to_rgb(np.asarray(im.convert("L")), conversions), None
    if mode in ("LA", "La"):
        la = np.asarray(im.convert("LA"))
        conversions.append(f"{mode} -> RGBA (alpha kept)")
        return _grey_to_rgb(la[:, :, 0], conversions), la[:, :, 1].copy()
    if mode in ("P", "PA"):
        if mode == "PA" or im.has_transparency_data:
            rgba = np.asarray(im.convert("RGBA"))
            conversions.append(f"{mode} -> RGBA (palette transparency)")
            return np.ascontiguousarray(rgba[:, :, :3]), rgba[:, :, 3].copy()
        conversions.append(f"{mode} -> RGB")
        return np.asarray(im.convert("RGB")).copy(), None
    if ";16" in rawmode and mode in ("RGB", "RGBA"):
        conversions.append(f"16-bit {mode} -> 8-bit (by Pillow)")
    if mode in ("RGBA", "RGBa"):
        if mode == "RGBa":
            conversions.append("RGBa (premultiplied) -> RGBA")
        rgba = np.asarray(im.convert("RGBA"))
        return np.ascontiguousarray(rgba[:, :, :3]), rgba[:, :, 3].copy()
    if mode == "RGB":
        return np.asarray(im).copy(), None
    try:
        rgb = np.asarray(im.convert("RGB")).copy()
    except (ValueError, OSError) as e:
        raise ImageDecodeError(f"cannot convert mode {mode} to RGB ({e})") from e
    conversions.append(f"{mode} -> RGB")
    return rgb, None


def decode_image(data: bytes) -> DecodedImage:
    """Decodes an image file's bytes into 8-bit RGB (+ alpha), recording every conversion.

    Args:
        data: the whole file.

    Returns:
        The decoded image (see :class:`DecodedImage` and the module docstring).

    Raises:
        ImageDecodeError: empty, unidentified, truncated or corrupt data, or an unsupported
            mode; the message says which.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    conversions: list[str] = []
    try:
        # Only the promised decoders: Pillow would otherwise hand, say, an EPS file named
        # .png to Ghostscript.
        Image.init()
        formats = [f for f in _PIL_FORMATS if f in Image.OPEN]  # WebP may be compiled out
        with Image.open(io.BytesIO(data), formats=formats) as im:
            fmt, mode = im.format or "?", im.mode
            frames = getattr(im, "n_frames", 1)
            rawmode = _rawmode(im)
            im.load()  # decodes now, so truncated or corrupt data raises here
            if frames > 1:
                conversions.append(f"first of {frames} frames")
            try:
                orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
            except Exception:  # a broken EXIF block must not lose the image
                orientation = 1
                conversions.append("unreadable EXIF ignored")
            img = im
            if orientation not in (None, 1):
                img = ImageOps.exif_transpose(im)
                conversions.append(f"EXIF orientation {orientation} applied")
            if im.info.get("icc_profile"):
                conversions.append("embedded ICC profile not applied")
            rgb, alpha = _to_rgb_alpha(img, rawmode, conversions)
    except ImageDecodeError:
        raise
    except Image.UnidentifiedImageError as e:
        raise ImageDecodeError("not a recognised image file (PNG, JPEG, BMP, TIFF, WebP)") from e
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error...
        raise ImageDecodeError(f"cannot decode ({type(e).__name__}: {e})") from e
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ImageDecodeError(f"unexpected decoded shape {rgb.shape} {rgb.dtype}")
    return DecodedImage(np.ascontiguousarray(rgb), alpha, conversions, fmt, mode)


def _png(rgb_chw: np.ndarray, alpha: np.ndarray | None) -> bytes:
    """8-bit PNG bytes of (3, H, W) uint8 RGB plus an optional (H, W) alpha plane."""
    arr = rgb_chw if alpha is None else np.concatenate([rgb_chw, alpha[None]], axis=0)
    buf = io.BytesIO()
    # compress_level=1 as in raeg_pl.io.protected.png_bytes: protected images are noisy and
    # higher levels cost much more time for a few percent.
    Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0))).save(
        buf, format="PNG", compress_level=1
    )
    return buf.getvalue()


def _decode_stored_png(data: bytes, entry: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    """A protected or recovered PNG written by this module: (3, H, W) uint8 and alpha."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        mode = im.mode
        arr = np.asarray(im)
    if mode != entry.get("mode") or arr.shape[:2] != (entry["height"], entry["width"]):
        raise ImageDecodeError(
            f"stored image is {mode} {arr.shape[1]}x{arr.shape[0]}, manifest says "
            f"{entry.get('mode')} {entry['width']}x{entry['height']}"
        )
    alpha = arr[:, :, 3].copy() if mode == "RGBA" else None
    return np.ascontiguousarray(arr[:, :, :3].transpose(2, 0, 1)), alpha


# ------------------------------------------------------------------- network application
@contextlib.contextmanager
def _exact_math() -> Iterator[None]:
    """No TF32 on CUDA: reduced-precision matmuls would make restores device-dependent."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _net_apply(
    fn: Callable[[torch.Tensor], torch.Tensor], x_u8: np.ndarray, device: torch.device, tile: int
) -> np.ndarray:
    """Runs the protector (or its inverse) on 8-bit images, tile by tile when they are large.

    Args:
        fn: ``net.forward`` or ``net.inverse`` on (B, 3, h, w) float images in [0, 1].
        x_u8: (B, 3, H, W) uint8.
        device: where to run.
        tile: tile side (0: whole images). Images with a side above ``tile`` are cut into a
            grid of ``tile x tile`` tiles from the top-left corner, each processed alone.

    Returns:
        (B, 3, H, W) float32 in [0, 255] (clamped, not rounded).
    """
    x = torch.from_numpy(np.ascontiguousarray(x_u8)).to(device).float().div_(255)
    h, w = x.shape[-2:]
    with _exact_math():
        if tile and (h > tile or w > tile):
            y = torch.empty_like(x)
            for i in range(0, h, tile):
                for j in range(0, w, tile):
                    part = x[..., i : i + tile, j : j + tile].contiguous()
                    y[..., i : i + tile, j : j + tile] = fn(part)
        else:
            y = fn(x)
    return y.clamp_(0, 1).mul_(255).cpu().numpy()


def _restore_values(
    net: InvertibleProtector, protected: np.ndarray, device: torch.device, tile: int
) -> np.ndarray:
    """The restore path of ONE image, shared by lossless protect and restore.

    Always batch 1: CPU convolutions give slightly different float results for different
    batch compositions, and the lossless residual is only exact if protect and restore
    compute the same values.

    Args:
        protected: (3, H, W) uint8 protected image.

    Returns:
        (3, H, W) float32 in [0, 255]; ``np.round`` of it is the plain restored image.
    """
    return _net_apply(net.inverse, protected[None], device, tile)[0]


# ----------------------------------------------------------------------- residual coding
def _quantize(values: np.ndarray, floor_at: np.ndarray | None = None) -> np.ndarray:
    q = np.round(values)
    if floor_at is not None and floor_at.size:
        flat = q.reshape(-1)
        flat[floor_at] = np.floor(values.reshape(-1)[floor_at])
    return q.astype(np.int16)


def encode_residual(
    original: np.ndarray, values: np.ndarray, margin: float = LOSSLESS_MARGIN
) -> bytes:
    """Codes what restore needs, beyond the protected image, to get ``original`` exactly.

    Restore computes ``values`` = 255 * clamp(G^-1(protected)) and rounds them. Rounding is
    only reproducible if restore gets exactly the same floats; on other hardware or library
    versions the floats may differ in the last bits, which flips the rounding of values
    that sit almost exactly on a ``k + 0.5`` boundary. So values within ``margin`` of a
    boundary are listed by position and quantised with ``floor`` instead (which cannot
    flip there); every other value is rounded, which cannot flip either as long as the
    floats differ by less than ``margin``.

    Format: a 29-byte header (``<4sBIIIdI``: magic ``RRS1``, codec id, C, H, W, margin,
    number of floor positions), then one compressed stream of the zigzag-coded int16
    residual ``original - quantised`` as two uint8 planes (low bytes, then high bytes:
    almost all zero) in (C, H, W) order, followed by the floor positions as uint32 deltas
    of their flat (C, H, W) indices. The stream is compressed with both zlib and bz2 (level
    9) and the smaller is kept: bz2 wins on photos (near order-0 entropy on these
    near-Laplacian residuals, and several times faster than lzma's extreme preset, which
    was not smaller), zlib on tiny images, where bz2's fixed overhead dominates.

    Args:
        original: (3, H, W) uint8 original pixels.
        values: (3, H, W) float32 restore values from :func:`_restore_values`.
        margin: half-width of the untrusted band around rounding boundaries, in levels.

    Returns:
        The sidecar file's bytes.
    """
    values = np.asarray(values, dtype=np.float32)
    frac = values - np.floor(values)
    floor_at = np.flatnonzero(np.abs(frac - np.float32(0.5)) < margin).astype(np.int64)
    residual = original.astype(np.int16) - _quantize(values, floor_at)
    zigzag = ((residual << 1) ^ (residual >> 15)).view(np.uint16)
    deltas = np.diff(floor_at, prepend=0).astype("<u4")
    payload = (
        (zigzag & 0xFF).astype(np.uint8).tobytes()
        + (zigzag >> 8).astype(np.uint8).tobytes()
        + deltas.tobytes()
    )
    codec, packed = min(
        ((i, compress(payload)) for i, (compress, _) in enumerate(_CODECS)),
        key=lambda c: len(c[1]),
    )
    header = _RESIDUAL_HEADER.pack(_RESIDUAL_MAGIC, codec, *original.shape, margin, floor_at.size)
    return header + packed


def decode_residual(data: bytes, values: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_residual`: the original (3, H, W) uint8 pixels.

    Args:
        data: sidecar bytes.
        values: (3, H, W) float32 restore values of the protected image.

    Raises:
        ValueError: not a residual file, wrong shape, or a result outside 0..255 (the values
            are not those the residual was made for).
    """
    if len(data) < _RESIDUAL_HEADER.size or not data.startswith(_RESIDUAL_MAGIC):
        raise ValueError("not a RAEG residual file")
    _, codec, c, h, w, _, floor_count = _RESIDUAL_HEADER.unpack_from(data)
    shape = (c, h, w)
    if shape != tuple(values.shape):
        raise ValueError(f"residual is for shape {shape}, image is {tuple(values.shape)}")
    if codec >= len(_CODECS):
        raise ValueError(f"unknown residual codec {codec}")
    payload = _CODECS[codec][1](data[_RESIDUAL_HEADER.size :])
    size = c * h * w
    if len(payload) != 2 * size + 4 * floor_count:
        raise ValueError("residual payload has the wrong length")
    planes = np.frombuffer(payload, np.uint8, count=2 * size)
    zigzag = planes[:size].astype(np.uint16) | (planes[size:].astype(np.uint16) << 8)
    residual = ((zigzag >> 1).astype(np.int16) ^ -(zigzag & 1).astype(np.int16)).reshape(shape)
    deltas = np.frombuffer(payload, "<u4", count=floor_count, offset=2 * size)
    floor_at = np.cumsum(deltas.astype(np.int64))
    out = _quantize(np.asarray(values, dtype=np.float32), floor_at) + residual
    if out.min() < 0 or out.max() > 255:
        raise ValueError("residual does not fit this image (restored values leave 0..255)")
    return out.astype(np.uint8)


# ------------------------------------------------------------------------ output folders
def _write_atomic_owned(path: Path, data: bytes, fsync: bool = False) -> None:
    """Atomic write whose temporary name carries the reserved prefix (see _remove_temp_files)."""
    write_atomic(path, data, fsync=fsync, prefix=TMP_PREFIX, suffix=TMP_SUFFIX)


def _remove_temp_files(root: Path) -> int:
    removed = 0
    if root.is_dir():
        for rel in _walk_files(root):
            name = PurePosixPath(rel).name
            if name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX):
                (root / rel).unlink(missing_ok=True)
                removed += 1
    return removed


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FolderError(f"{path}: unreadable {what} ({e})") from e
    if not isinstance(data, dict):
        raise FolderError(f"{path}: not a {what}")
    return data


def read_folder_manifest(folder: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """The manifest of a folder written by this module.

    Raises:
        FolderError: no manifest (an unfinished run when the journal is there), not one of
            ours, or not of ``kind``.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        if (folder / JOURNAL).exists():
            raise FolderError(f"{folder}: unfinished run (journal, no manifest); run it again")
        raise FolderError(f"{folder}: no {MANIFEST}")
    manifest = _read_json(path, "manifest")
    if manifest.get("format") != FOLDER_FORMAT or not isinstance(manifest.get("files"), dict):
        raise FolderError(f"{path}: not a raeg folder manifest")
    if kind is not None and manifest.get("kind") != kind:
        raise FolderError(f"{path}: folder kind is {manifest.get('kind')!r}, expected {kind!r}")
    return manifest


class _OutputFolder:
    """An output folder under construction: journal, ownership, atomic writes, manifest.

    Args:
        root: the output folder.
        kind: ``protected`` or ``recovered``.
        fingerprint: the key's fingerprint; a folder started with another key is refused.
        sidecar_root: optional second folder for sidecar files (same ownership rules).
    """

    def __init__(
        self, root: Path, kind: str, fingerprint: str, sidecar_root: Path | None = None
    ) -> None:
        self.root, self.kind, self.fingerprint = root, kind, fingerprint
        self.sidecar_root = sidecar_root
        self.records: dict[str, dict[str, Any]] = {}
        self.owned: set[str] = set()
        self.owned_sidecars: set[str] = set()
        self.removed_temp_files = 0
        self._journal: Any = None

    # -- opening
    def _check_header(self, header: dict[str, Any], where: Path) -> None:
        if header.get("kind") != self.kind:
            raise FolderError(
                f"{where}: folder holds {header.get('kind')!r} data, not {self.kind!r}"
            )
        if header.get("key_fingerprint") != self.fingerprint:
            raise KeyMismatchError(
                f"{where}: started with another key (fingerprint "
                f"{str(header.get('key_fingerprint'))[:16]}..., this key {self.fingerprint[:16]}...)"
            )

    def _add(self, rel: str, entry: dict[str, Any]) -> None:
        self.records[rel] = entry
        self.owned.add(rel)
        if entry.get("sidecar"):
            self.owned_sidecars.add(entry["sidecar"]["file"])

    def open(self) -> None:
        """Validates what is already there, takes the lock, cleans temporary files."""
        manifest_path, journal_path = self.root / MANIFEST, self.root / JOURNAL
        manifest = None
        if manifest_path.exists():
            manifest = _read_json(manifest_path, "manifest")
            if manifest.get("format") != FOLDER_FORMAT:
                raise FolderError(f"{manifest_path}: exists and was not written by raeg")
            self._check_header(manifest, manifest_path)
        if self.sidecar_root is not None and (self.sidecar_root / SIDECAR_INDEX).exists():
            index = _read_json(self.sidecar_root / SIDECAR_INDEX, "sidecar index")
            if index.get("format") != FOLDER_FORMAT or index.get("kind") != "sidecar":
                raise FolderError(f"{self.sidecar_root / SIDECAR_INDEX}: not a raeg sidecar index")
            if index.get("key_fingerprint") != self.fingerprint:
                raise KeyMismatchError(f"{self.sidecar_root}: sidecar made with another key")
        self.root.mkdir(parents=True, exist_ok=True)
        journal = open(journal_path, "a+b")  # noqa: SIM115 - held open until finish()
        if fcntl is not None:
            try:
                fcntl.flock(journal.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                journal.close()
                raise FolderError(f"{self.root}: another raeg run is writing this folder") from e
        try:
            journal.seek(0)
            lines = journal.read().split(b"\n")
            records = [r for r in (self._parse(line) for line in lines) if r is not None]
            if records and records[0].get("op") != "header":
                raise FolderError(f"{journal_path}: not a raeg journal")
            if records:
                self._check_header(records[0], journal_path)
        except BaseException:
            journal.close()
            raise
        if manifest is not None:
            for rel, entry in manifest["files"].items():
                self._add(rel, entry)
        for rec in records[1:]:
            if rec.get("op") == "begin":
                self.owned.update(rec.get("files", []))
                self.owned_sidecars.update(rec.get("sidecars", []))
            elif rec.get("op") == "done":
                self._add(rec["file"], rec["entry"])
        self._journal = journal
        if lines and lines[-1]:  # a line cut by a kill: end it, so the next one parses
            journal.write(b"\n")
        if not records:
            self._append(
                {
                    "op": "header",
                    "format": "raeg-journal",
                    "kind": self.kind,
                    "key_fingerprint": self.fingerprint,
                    "tool_version": raeg_pl.__version__,
                }
            )
        if manifest is not None:
            # Fold the finished manifest into the journal and drop it: from now on the
            # folder is "in progress" until finish() writes the new manifest.
            for rel, entry in manifest["files"].items():
                self._append({"op": "done", "file": rel, "entry": entry})
            self.sync()
            manifest_path.unlink()
        self.sync()
        self.removed_temp_files = _remove_temp_files(self.root)
        if self.sidecar_root is not None:
            self.removed_temp_files += _remove_temp_files(self.sidecar_root)

    @staticmethod
    def _parse(line: bytes) -> dict[str, Any] | None:
        if not line.strip():
            return None
        try:
            rec = json.loads(line)
        except ValueError:
            return None  # a line cut short by a kill
        return rec if isinstance(rec, dict) else None

    # -- journal
    def _append(self, record: dict[str, Any]) -> None:
        self._journal.write(json.dumps(record, sort_keys=True).encode() + b"\n")
        self._journal.flush()

    def sync(self) -> None:
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def begin(self, files: list[str], sidecars: list[str]) -> None:
        """Records (fsynced) that these outputs are about to be written, so they are ours."""
        self.owned.update(files)
        self.owned_sidecars.update(sidecars)
        self._append({"op": "begin", "files": files, "sidecars": sidecars})
        self.sync()

    def done(self, rel: str, entry: dict[str, Any]) -> None:
        self._add(rel, entry)
        self._append({"op": "done", "file": rel, "entry": entry})

    # -- files
    def can_write(self, rel: str) -> str | None:
        """None when ``rel`` may be written, else why not."""
        path = self.root / rel
        if os.path.lexists(path) and rel not in self.owned:
            return f"output {rel} exists and was not written by raeg; not overwritten"
        if path.is_dir():
            return f"output {rel} is a folder"
        return None

    def can_write_sidecar(self, rel: str) -> str | None:
        assert self.sidecar_root is not None
        path = self.sidecar_root / rel
        if os.path.lexists(path) and rel not in self.owned_sidecars:
            return f"sidecar {rel} exists and was not written by raeg; not overwritten"
        return None

    def intact(self, rel: str, entry: dict[str, Any], need_sidecar: bool) -> bool:
        """Whether a recorded output (and its sidecar, if needed) still has its hash."""
        try:
            if sha256_file(self.root / rel) != entry["sha256"]:
                return False
            if need_sidecar:
                sc = entry.get("sidecar")
                if not sc or self.sidecar_root is None:
                    return False
                return sha256_file(self.sidecar_root / sc["file"]) == sc["sha256"]
        except OSError:
            return False
        return True

    def write(self, rel: str, data: bytes) -> None:
        _write_atomic_owned(self.root / rel, data)

    def write_sidecar(self, rel: str, data: bytes) -> None:
        assert self.sidecar_root is not None
        _write_atomic_owned(self.sidecar_root / rel, data)

    # -- closing
    def finish(self, manifest: dict[str, Any], sidecar_index: dict[str, Any] | None = None) -> Path:
        """Writes the manifest (and sidecar index) atomically, then drops the journal."""
        text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
        if sidecar_index is not None and self.sidecar_root is not None:
            index_text = json.dumps(sidecar_index, indent=1, sort_keys=True) + "\n"
            _write_atomic_owned(self.sidecar_root / SIDECAR_INDEX, index_text.encode(), fsync=True)
        _write_atomic_owned(self.root / MANIFEST, text.encode(), fsync=True)
        (self.root / JOURNAL).unlink(missing_ok=True)
        self.close()
        return self.root / MANIFEST

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None


# --------------------------------------------------------------------------- batching
class _Batcher:
    """Holds decoded images until a batch is due, then runs it, grouped by size.

    At most ``batch_size`` images or about ``max_pixels`` pixels are pending at any time,
    so memory does not depend on the number of files. Images larger than the tile size are
    run alone.
    """

    def __init__(self, batch_size: int, max_pixels: int, run: Callable[[list[Any]], None]) -> None:
        self.batch_size, self.max_pixels, self.run = max(1, batch_size), max_pixels, run
        self.items: list[Any] = []
        self.pixels = 0

    def add(self, item: Any, group: Any, pixels: int) -> None:
        self.items.append((group, item))
        self.pixels += pixels
        if len(self.items) >= self.batch_size or self.pixels >= self.max_pixels:
            self.flush()

    def flush(self) -> None:
        groups: dict[Any, list[Any]] = defaultdict(list)
        for group, item in self.items:
            groups[group].append(item)
        self.items, self.pixels = [], 0
        for members in groups.values():
            for i in range(0, len(members), self.batch_size):
                self.run(members[i : i + self.batch_size])


def _group_key(h: int, w: int, tile: int, index: int) -> tuple[Any, ...]:
    return ("alone", index) if tile and (h > tile or w > tile) else (h, w, tile)


# ------------------------------------------------------------------------------- helpers
def _as_protector(key: InvertibleProtector | str | os.PathLike) -> InvertibleProtector:
    if isinstance(key, InvertibleProtector):
        return key.eval()
    from raeg_pl.io.keyfile import load_key

    return load_key(key)


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise FolderError(f"unknown device {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FolderError(f"device {device!r} requested but CUDA is not available")
    return dev


def _read_source_bytes(path: Path) -> bytes:
    """Reads a whole input file (one place, so tests can simulate unreadable files)."""
    return path.read_bytes()


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True)


def _bpp_totals(entries: dict[str, dict[str, Any]]) -> tuple[int | None, float | None]:
    sized = [e for e in entries.values() if e.get("sidecar")]
    if not sized:
        return None, None
    nbytes = sum(e["sidecar"]["bytes"] for e in sized)
    pixels = sum(e["width"] * e["height"] for e in sized)
    return nbytes, 8.0 * nbytes / max(1, pixels)


def _read_error(e: OSError) -> str:
    return f"cannot read ({type(e).__name__}: {e.strerror or e})"


# ------------------------------------------------------------------------------- protect
def protect_folder(
    key: InvertibleProtector | str | os.PathLike,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    lossless: bool = False,
    sidecar_dir: str | os.PathLike | None = None,
    progress: bool = True,
    tile: int = DEFAULT_TILE,
    max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS,
    lossless_margin: float = LOSSLESS_MARGIN,
) -> FolderSummary:
    """Protects every image under ``input_dir`` into 8-bit PNGs under ``output_dir``.

    Resumable: run it again after an interruption (or after adding files) and it finishes
    the rest. See the module docstring for formats, conversions, naming and safety rules.

    Args:
        key: a key file path (:mod:`raeg_pl.io.keyfile`) or an :class:`InvertibleProtector`
            (moved to ``device``).
        input_dir: folder of source images; only read.
        output_dir: protected folder (created); gets ``manifest.json``.
        batch_size: images per network call (same-size images are batched together).
        device: torch device for the network (``cpu``, ``cuda``, ``cuda:1``...).
        lossless: also write a residual per image so restore can be bit-exact.
        sidecar_dir: where the residuals go (implies ``lossless``); default
            ``<output_dir>.sidecar`` beside ``output_dir``.
        progress: show a tqdm progress bar (images/s) on stderr.
        tile: images larger than this on a side are protected in ``tile x tile`` tiles; a
            multiple of ``2**levels`` of the network; 0 disables tiling.
        max_batch_pixels: pixel budget of one batch of pending images.
        lossless_margin: see :func:`encode_residual`.

    Returns:
        The summary; ``summary.failed`` maps input paths to reasons.

    Raises:
        FolderError: refused paths (OUT == IN, one inside the other), an output folder made
            with another key or of another kind, an invalid tile size; nothing is written.
        KeyFileError: an unusable key file.
    """
    t0 = time.perf_counter()
    net = _as_protector(key)
    dev = _device(device)
    src, out_root = _resolve(input_dir), _resolve(output_dir)
    if sidecar_dir is not None:
        lossless = True
    sc_root = None
    if lossless:
        sc_root = (
            _resolve(sidecar_dir) if sidecar_dir else out_root.with_name(out_root.name + ".sidecar")
        )
    _check_layout(src, out_root, sc_root)
    mult = 2**net.levels
    if tile < 0 or tile % mult:
        raise FolderError(f"tile must be 0 or a positive multiple of {mult}, got {tile}")
    net = net.to(dev)
    fingerprint = net.fingerprint()
    images, ignored = list_images(src)
    names, name_failures = plan_output_names(images)
    folder = _OutputFolder(out_root, "protected", fingerprint, sc_root)
    folder.open()
    summary = FolderSummary(
        "protect", str(src), str(out_root), str(sc_root) if sc_root else None, total=len(images)
    )
    summary.ignored, summary.removed_temp_files = ignored, folder.removed_temp_files
    slow = float(os.environ.get(SLOW_ENV) or 0) / 1000.0
    bar = _progress(len(images), "protect", progress)

    def fail(rel: str, reason: str) -> None:
        summary.failed[rel] = reason
        bar.update(1)

    def run(chunk: list[tuple[str, str, DecodedImage, dict[str, Any]]]) -> None:
        try:
            x = np.stack([img.rgb.transpose(2, 0, 1) for _, _, img, _ in chunk])
            protected = np.round(_net_apply(net.forward, x, dev, tile)).astype(np.uint8)
            results = []
            for (rel, out_rel, img, meta), prot in zip(chunk, protected):
                png = _png(prot, img.alpha)
                entry = {**meta, "sha256": sha256_bytes(png), "tile": tile}
                residual = None
                if lossless:
                    values = _restore_values(net, prot, dev, tile)
                    residual = encode_residual(img.rgb.transpose(2, 0, 1), values, lossless_margin)
                    entry["sidecar"] = {
                        "file": out_rel + SIDECAR_SUFFIX,
                        "sha256": sha256_bytes(residual),
                        "bytes": len(residual),
                        "bits_per_pixel": 8.0
                        * len(residual)
                        / (img.rgb.shape[0] * img.rgb.shape[1]),
                    }
                results.append((rel, out_rel, png, residual, entry))
        except (RuntimeError, MemoryError, ValueError) as e:
            for rel, *_ in chunk:
                fail(rel, f"protection failed ({type(e).__name__}: {e})")
            return
        folder.begin(
            [r[1] for r in results], [r[4]["sidecar"]["file"] for r in results if r[3] is not None]
        )
        for rel, out_rel, png, residual, entry in results:
            try:
                if residual is not None:
                    folder.write_sidecar(entry["sidecar"]["file"], residual)
                folder.write(out_rel, png)
            except OSError as e:
                fail(rel, f"cannot write output ({type(e).__name__}: {e.strerror or e})")
                continue
            folder.done(out_rel, entry)
            summary.written.append(rel)
            bar.update(1)
            if slow:
                time.sleep(slow)
        folder.sync()

    batcher = _Batcher(batch_size, max_batch_pixels, run)
    try:
        for index, rel in enumerate(images):
            out_rel = names.get(rel)
            if out_rel is None:
                fail(rel, name_failures[rel])
                continue
            try:
                data = _read_source_bytes(src / rel)
            except OSError as e:
                fail(rel, _read_error(e))
                continue
            source_sha = sha256_bytes(data)
            rec = folder.records.get(out_rel)
            if (
                rec is not None
                and rec.get("source") == rel
                and rec.get("source_sha256") == source_sha
                and folder.intact(out_rel, rec, need_sidecar=lossless)
            ):
                summary.skipped.append(rel)
                bar.update(1)
                continue
            why = folder.can_write(out_rel)
            if why is None and lossless:
                why = folder.can_write_sidecar(out_rel + SIDECAR_SUFFIX)
            if why is not None:
                fail(rel, why)
                continue
            try:
                img = decode_image(data)
            except ImageDecodeError as e:
                fail(rel, str(e))
                continue
            h, w = img.rgb.shape[:2]
            meta = {
                "source": rel,
                "source_sha256": source_sha,
                "source_bytes": len(data),
                "source_format": img.source_format,
                "source_mode": img.source_mode,
                "source_pixel_sha256": pixel_sha256(img.rgb, img.alpha),
                "width": w,
                "height": h,
                "mode": "RGB" if img.alpha is None else "RGBA",
                "conversions": img.conversions,
            }
            del data
            batcher.add((rel, out_rel, img, meta), _group_key(h, w, tile, index), h * w)
        batcher.flush()
        bar.close()
        # Only entries of current inputs that were not just refused: an older output of an
        # input that now fails (edited into a corrupt file, say) no longer belongs here.
        files = {
            rel: e
            for rel, e in sorted(folder.records.items())
            if names.get(e.get("source")) == rel and e["source"] not in summary.failed
        }
        sc_bytes, sc_bpp = _bpp_totals(files)
        manifest = {
            "format": FOLDER_FORMAT,
            "format_version": FOLDER_FORMAT_VERSION,
            "kind": "protected",
            "tool_version": raeg_pl.__version__,
            "key_fingerprint": fingerprint,
            "protector_config": net.config,
            "num_images": len(files),
            "lossless": bool(files) and all("sidecar" in e for e in files.values()),
            "sidecar_bytes": sc_bytes,
            "sidecar_bits_per_pixel": sc_bpp,
            "failed": dict(sorted(summary.failed.items())),
            "files": files,
        }
        index = None
        if sc_root is not None:
            index = {
                "format": FOLDER_FORMAT,
                "kind": "sidecar",
                "key_fingerprint": fingerprint,
                "tool_version": raeg_pl.__version__,
                "files": {rel: e["sidecar"] for rel, e in files.items() if e.get("sidecar")},
            }
        summary.manifest = str(folder.finish(manifest, index))
    finally:
        bar.close()
        folder.close()
    summary.sidecar_bytes, summary.sidecar_bits_per_pixel = sc_bytes, sc_bpp
    summary.seconds = time.perf_counter() - t0
    summary.images_per_s = len(summary.written) / max(summary.seconds, 1e-9)
    return summary


# ------------------------------------------------------------------------------- restore
def _present_files(folder: Path, manifest: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(missing, extra) relative paths of a folder against its manifest."""
    present = set(_walk_files(folder)) - {MANIFEST}
    listed = set(manifest["files"])
    return sorted(listed - present), sorted(present - listed)


def restore_folder(
    key: InvertibleProtector | str | os.PathLike,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    sidecar_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = True,
    max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS,
) -> FolderSummary:
    """Restores a protected folder into recovered 8-bit PNGs (alpha re-attached).

    The key is checked against the manifest before anything is created. Protected files
    that are missing, modified (hash mismatch) or not in the manifest are reported by name;
    the rest are restored. With ``sidecar_dir`` every file is restored bit for bit and
    checked against the manifest's source pixel hash (a mismatch is a failure and nothing
    is written for that file). Resumable like :func:`protect_folder`.

    Args:
        key: key file path or protector.
        input_dir: a protected folder (with its ``manifest.json``); only read.
        output_dir: recovered folder (created), same relative paths, ``manifest.json`` of
            kind ``recovered``.
        sidecar_dir: the lossless sidecar folder written by protect, or None.
        batch_size: images per network call without sidecar (with a sidecar every image is
            restored alone, exactly as protect computed its residual).
        device: torch device.
        progress: show a progress bar.
        max_batch_pixels: pixel budget of one batch.

    Raises:
        KeyMismatchError: the key is not the one the folder was protected with.
        FolderError: refused paths, no or foreign manifest, unfinished protect run, a sidecar
            folder for a folder protected without one.
    """
    t0 = time.perf_counter()
    net = _as_protector(key)
    dev = _device(device)
    src, out_root = _resolve(input_dir), _resolve(output_dir)
    sc_root = _resolve(sidecar_dir) if sidecar_dir is not None else None
    _check_layout(src, out_root, sc_root, in_name="protected")
    manifest = read_folder_manifest(src, kind="protected")
    fingerprint = net.fingerprint()
    if manifest.get("key_fingerprint") != fingerprint:
        raise KeyMismatchError(
            f"wrong key for {src}: it was protected with key {str(manifest.get('key_fingerprint'))[:16]}..., "
            f"this key is {fingerprint[:16]}...; nothing written"
        )
    entries: dict[str, dict[str, Any]] = manifest["files"]
    lossless = sc_root is not None
    if lossless:
        if not sc_root.is_dir():
            raise FolderError(f"sidecar folder not found: {sc_root}")
        if not any(e.get("sidecar") for e in entries.values()):
            raise FolderError(f"{src} was protected without a lossless sidecar")
        index_path = sc_root / SIDECAR_INDEX
        if (
            index_path.exists()
            and _read_json(index_path, "sidecar index").get("key_fingerprint") != fingerprint
        ):
            raise KeyMismatchError(f"{sc_root}: sidecar made with another key")
    net = net.to(dev)
    summary = FolderSummary(
        "restore", str(src), str(out_root), str(sc_root) if sc_root else None, total=len(entries)
    )
    summary.missing, summary.extra = _present_files(src, manifest)
    folder = _OutputFolder(out_root, "recovered", fingerprint)
    folder.open()
    summary.removed_temp_files = folder.removed_temp_files
    bar = _progress(len(entries), "restore", progress)
    exact_count = 0

    def fail(rel: str, reason: str) -> None:
        summary.failed[rel] = reason
        bar.update(1)

    def finish_one(rel: str, entry: dict[str, Any], prot_sha: str, rgb: np.ndarray, alpha) -> None:
        nonlocal exact_count
        pixels = pixel_sha256(rgb.transpose(1, 2, 0), alpha)
        exact = pixels == entry["source_pixel_sha256"]
        if lossless and not exact:
            fail(
                rel,
                "lossless restore does not match the source pixel hash (sidecar or key problem)",
            )
            return
        png = _png(rgb, alpha)
        out_entry = {
            "source": rel,
            "source_sha256": prot_sha,
            "original_source": entry["source"],
            "source_pixel_sha256": entry["source_pixel_sha256"],
            "pixel_sha256": pixels,
            "exact": exact,
            "lossless": lossless,
            "sha256": sha256_bytes(png),
            "width": entry["width"],
            "height": entry["height"],
            "mode": entry["mode"],
        }
        try:
            folder.write(rel, png)
        except OSError as e:
            fail(rel, f"cannot write output ({type(e).__name__}: {e.strerror or e})")
            return
        folder.done(rel, out_entry)
        summary.written.append(rel)
        bar.update(1)

    def run(chunk: list[tuple[str, dict[str, Any], str, np.ndarray, Any, bytes | None]]) -> None:
        folder.begin([c[0] for c in chunk], [])
        try:
            if lossless:
                values = [_restore_values(net, c[3], dev, c[1].get("tile", 0)) for c in chunk]
            else:
                tile = chunk[0][1].get("tile", 0)
                values = list(_net_apply(net.inverse, np.stack([c[3] for c in chunk]), dev, tile))
        except (RuntimeError, MemoryError) as e:
            for c in chunk:
                fail(c[0], f"restore failed ({type(e).__name__}: {e})")
            return
        for (rel, entry, prot_sha, _, alpha, residual), v in zip(chunk, values):
            if residual is not None:
                try:
                    rgb = decode_residual(residual, v)
                except (ValueError, OSError, EOFError) as e:
                    fail(rel, f"sidecar unusable ({e})")
                    continue
            else:
                rgb = np.round(v).astype(np.uint8)
            finish_one(rel, entry, prot_sha, rgb, alpha)
        folder.sync()

    batcher = _Batcher(1 if lossless else batch_size, max_batch_pixels, run)
    missing = set(summary.missing)
    try:
        for index, rel in enumerate(sorted(entries)):
            entry = entries[rel]
            if rel in missing:
                bar.update(1)
                continue
            try:
                data = _read_source_bytes(src / rel)
            except OSError as e:
                fail(rel, _read_error(e))
                continue
            prot_sha = sha256_bytes(data)
            if prot_sha != entry.get("sha256"):
                summary.modified.append(rel)
                bar.update(1)
                continue
            rec = folder.records.get(rel)
            if (
                rec is not None
                and rec.get("source_sha256") == prot_sha
                and rec.get("lossless") == lossless
                and folder.intact(rel, rec, need_sidecar=False)
            ):
                summary.skipped.append(rel)
                exact_count += bool(rec.get("exact"))
                bar.update(1)
                continue
            why = folder.can_write(rel)
            if why is not None:
                fail(rel, why)
                continue
            residual = None
            if lossless:
                sc = entry.get("sidecar")
                if not sc:
                    fail(rel, "no sidecar recorded for this file")
                    continue
                try:
                    residual = _read_source_bytes(sc_root / sc["file"])
                except OSError as e:
                    fail(rel, f"sidecar {sc['file']}: {_read_error(e)}")
                    continue
                if sha256_bytes(residual) != sc["sha256"]:
                    fail(rel, f"sidecar {sc['file']} does not match its recorded hash")
                    continue
            try:
                prot, alpha = _decode_stored_png(data, entry)
            except Exception as e:  # a file with the right hash decodes; this is defensive
                fail(rel, f"cannot decode protected file ({e})")
                continue
            h, w = prot.shape[1:]
            tile = entry.get("tile", 0)
            batcher.add(
                (rel, entry, prot_sha, prot, alpha, residual), _group_key(h, w, tile, index), h * w
            )
        batcher.flush()
        bar.close()
        listed = {r for r in entries}
        files = {r: e for r, e in sorted(folder.records.items()) if r in listed}
        summary.exact = sum(bool(e.get("exact")) for e in files.values())
        out_manifest = {
            "format": FOLDER_FORMAT,
            "format_version": FOLDER_FORMAT_VERSION,
            "kind": "recovered",
            "tool_version": raeg_pl.__version__,
            "key_fingerprint": fingerprint,
            "protected_manifest_sha256": sha256_file(src / MANIFEST),
            "lossless": lossless,
            "num_images": len(files),
            "num_exact": summary.exact,
            "failed": dict(sorted(summary.failed.items())),
            "missing": summary.missing,
            "modified": summary.modified,
            "extra": summary.extra,
            "files": files,
        }
        summary.manifest = str(folder.finish(out_manifest))
    finally:
        bar.close()
        folder.close()
    summary.seconds = time.perf_counter() - t0
    summary.images_per_s = len(summary.written) / max(summary.seconds, 1e-9)
    return summary


# -------------------------------------------------------------------------------- verify
def verify_folder_against_manifest(
    folder: str | os.PathLike, sidecar_dir: str | os.PathLike | None = None
) -> FolderSummary:
    """Checks a protected or recovered folder (and optionally a sidecar) against its manifest.

    Args:
        folder: a folder with ``manifest.json`` written by this module.
        sidecar_dir: for a protected folder, also check each file's sidecar residual.

    Returns:
        Summary with ``ok_files``, ``missing``, ``modified`` and ``extra`` (files present but
        not listed, including leftovers of an interrupted run); a bad or missing sidecar is
        listed in ``failed``.

    Raises:
        FolderError: no manifest, not ours, or an unfinished run.
    """
    root = _resolve(folder)
    manifest = read_folder_manifest(root)
    entries = manifest["files"]
    summary = FolderSummary(f"verify {manifest.get('kind')}", str(root), total=len(entries))
    summary.missing, summary.extra = _present_files(root, manifest)
    missing = set(summary.missing)
    sc_root = _resolve(sidecar_dir) if sidecar_dir is not None else None
    for rel in sorted(entries):
        if rel in missing:
            continue
        try:
            good = sha256_file(root / rel) == entries[rel]["sha256"]
        except OSError as e:
            summary.failed[rel] = _read_error(e)
            continue
        if not good:
            summary.modified.append(rel)
            continue
        sc = entries[rel].get("sidecar")
        if sc_root is not None:
            try:
                if not sc:
                    summary.failed[rel] = "no sidecar recorded"
                    continue
                if sha256_file(sc_root / sc["file"]) != sc["sha256"]:
                    summary.failed[rel] = f"sidecar {sc['file']} modified"
                    continue
            except OSError as e:
                summary.failed[rel] = f"sidecar {sc['file']}: {_read_error(e)}"
                continue
        summary.ok_files.append(rel)
    if manifest.get("kind") == "recovered":
        summary.exact = sum(bool(e.get("exact")) for e in entries.values())
    summary.sidecar_bytes = manifest.get("sidecar_bytes")
    summary.sidecar_bits_per_pixel = manifest.get("sidecar_bits_per_pixel")
    if sc_root is not None:
        summary.sidecar_dir = str(sc_root)
    return summary
