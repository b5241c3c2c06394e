"""Reading images: the one suffix list, folder listings and decoding to 8-bit pixels.

Every part of raeg_pl that reads image files (the owner commands, pipeline exports, the
dataset cache) lists them with :func:`list_images` / :func:`list_class_folder` and the one
suffix list :data:`IMAGE_SUFFIXES`.

Decoding (:func:`decode_image`, the owner commands' inputs)
    PNG, JPEG, BMP, TIFF, WebP and PNM files (by extension, case-insensitive; decoded by
    content, with only these decoders). Every input is brought to 8-bit RGB, plus an
    untouched alpha plane when it has one, and each conversion is recorded:

    * EXIF orientation is applied (``ImageOps.exif_transpose``) before anything else;
    * multi-frame files (TIFF pages, animated WebP/PNG) use their first frame;
    * ``L`` and ``1``: the grey plane is replicated to three channels (the protector is a
      3-channel network, so a protected or restored grey image is RGB);
    * ``LA``: as ``L``, plus alpha -> RGBA;
    * ``P``: -> RGBA when the palette has transparency, else -> RGB;
    * ``I;16*`` (16-bit grey) and ``I`` with values in 0..65535: ``round(v * 255 / 65535)``
      -> grey, then as ``L``; 16-bit RGB(A) PNGs are reduced to 8 bits by Pillow;
    * ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``: Pillow's ``convert("RGB")`` (no colour
      management: embedded ICC profiles are not applied, and that is recorded);
    * ``F`` (float) images are refused.

Stored PNGs (:func:`read_png`, :func:`read_stored_png`) are the store's own outputs; a
protected PNG of a label-conditioned key carries its class name in a ``raeg:label`` text
chunk (:data:`LABEL_CHUNK`), so the label is covered by the file's SHA-256.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

__all__ = [
    "IMAGE_SUFFIXES",
    "LABEL_CHUNK",
    "PIL_FORMATS",
    "DecodedImage",
    "ImageDecodeError",
    "ImageFolderError",
    "decode_image",
    "embedded_label",
    "is_image_file",
    "key_planes",
    "list_class_folder",
    "list_images",
    "pixel_sha256",
    "plan_output_names",
    "read_png",
    "read_error",
    "read_source_bytes",
    "read_stored_png",
    "stored_mode",
    "walk_files",
]

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
PIL_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "PPM")  # JPEG includes multi-picture (MPO)
LABEL_CHUNK = "raeg:label"


class ImageDecodeError(ValueError):
    """An input file could not be decoded into an 8-bit image."""


class ImageFolderError(ValueError):
    """A folder that cannot be listed as asked (not a folder, no classes, no images)."""


def is_image_file(name: str | os.PathLike) -> bool:
    """Whether a file name has one of the image suffixes (case-insensitive)."""
    return PurePosixPath(os.fspath(name)).suffix.lower() in IMAGE_SUFFIXES


def walk_files(root: Path) -> Iterator[str]:
    """Relative POSIX paths of all non-directory entries under ``root``, sorted.

    Symlinked folders are not followed.
    """
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(filenames):
            yield (base / name).relative_to(root).as_posix()


def list_images(input_dir: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Image files under ``input_dir`` (recursively) by suffix, and the other files.

    Returns:
        (images, ignored): sorted relative POSIX paths.
    """
    images, ignored = [], []
    for rel in walk_files(Path(input_dir)):
        (images if is_image_file(rel) else ignored).append(rel)
    return images, ignored


def list_class_folder(split_dir: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """Lists an ImageFolder split ``<split>/<class>/**/<image>``.

    Returns:
        (classes, samples): the sorted class-folder names (hidden ones skipped) and the
        sorted (relative path, class index) of every image file under them.

    Raises:
        ImageFolderError: not a folder, no class sub-folders, or no images in them.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise ImageFolderError(f"{split_dir}: not a directory")
    classes = sorted(
        d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
    )
    if not classes:
        raise ImageFolderError(
            f"{split_dir}: no class sub-folders (expected <split>/<class>/<image>)"
        )
    samples = [
        (os.path.join(name, *PurePosixPath(rel).parts), idx)
        for idx, name in enumerate(classes)
        for rel in list_images(split_dir / name)[0]
    ]
    samples.sort()
    if not samples:
        raise ImageFolderError(
            f"{split_dir}: class folders {classes} hold no image files {sorted(IMAGE_SUFFIXES)}"
        )
    return classes, samples


def read_source_bytes(path: Path) -> bytes:
    """Reads a whole input file (one place, so tests can simulate unreadable files)."""
    return path.read_bytes()


def read_error(e: OSError) -> str:
    """The reported reason of a file that could not be read."""
    return f"cannot read ({type(e).__name__}: {e.strerror or e})"


def plan_output_names(rels: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Output PNG names for input relative paths.

    ``a/b.jpg`` -> ``a/b.png``. When several inputs would get the same output name
    (``a.jpg`` and ``a.png``), the input whose own name is that ``.png`` name keeps it and
    every other one keeps its full name plus ``.png`` (``a.jpg`` -> ``a.jpg.png``); a name
    that still collides is a failure. The rule depends only on the set of input names,
    never on their order.

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


def key_planes(image: DecodedImage, channels: int) -> np.ndarray:
    """The (channels, H, W) uint8 planes a protector of ``channels`` channels takes.

    A 3-channel protector takes the RGB planes. A 1-channel (grayscale) protector takes the
    grey plane of an image whose three planes are equal (every grey input: see the
    decoding rules above); a colour image would lose its colour, so it is refused.

    Raises:
        ImageDecodeError: a colour image for a grayscale protector, or a channel count
            other than 1 or 3.
    """
    rgb = image.rgb
    if channels == 3:
        return np.ascontiguousarray(rgb.transpose(2, 0, 1))
    if channels == 1:
        if not (
            np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        ):
            raise ImageDecodeError(
                f"a colour image ({image.source_mode}); this key protects grayscale (1-channel) "
                "images only, and converting would lose the colour"
            )
        return np.ascontiguousarray(rgb[None, :, :, 0])
    raise ImageDecodeError(f"keys of {channels} channels are not supported (1 or 3)")


def stored_mode(channels: int, alpha: bool) -> str:
    """The PNG mode of a protected or restored image: ``L``/``LA`` or ``RGB``/``RGBA``."""
    return ("L" if channels == 1 else "RGB") + ("A" if alpha else "")


def pixel_sha256(rgb: np.ndarray, alpha: np.ndarray | None = None) -> str:
    """SHA-256 of 8-bit pixels: (H, W, 3) uint8 RGB plus an optional (H, W) alpha plane.

    A grey image given as (H, W, 1) is hashed as its RGB replica (grey inputs are decoded
    to RGB, so a grayscale key's restore matches its source's hash). The shape is hashed
    too, so images with the same bytes but other sizes differ.
    """
    if rgb.ndim == 3 and rgb.shape[2] == 1:
        rgb = np.repeat(rgb, 3, axis=2)
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
        formats = [f for f in PIL_FORMATS if f in Image.OPEN]  # WebP may be compiled out
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
        raise ImageDecodeError(
            "not a recognised image file (PNG, JPEG, BMP, TIFF, WebP, PNM)"
        ) from e
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error...
        raise ImageDecodeError(f"cannot decode ({type(e).__name__}: {e})") from e
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ImageDecodeError(f"unexpected decoded shape {rgb.shape} {rgb.dtype}")
    return DecodedImage(np.ascontiguousarray(rgb), alpha, conversions, fmt, mode)


def read_png(path: str | os.PathLike) -> torch.Tensor:
    """Reads an 8-bit image file as (C, H, W) uint8 (C = 1, 3 or 4, as stored)."""
    with Image.open(path) as im:
        arr = np.array(im)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def embedded_label(path: str | os.PathLike) -> str | None:
    """The class name in a stored PNG's ``raeg:label`` chunk (None: none, or not a PNG)."""
    try:
        with Image.open(path, formats=["PNG"]) as im:
            label = im.info.get(LABEL_CHUNK)
    except (OSError, Image.UnidentifiedImageError, SyntaxError, ValueError):
        return None
    return label if isinstance(label, str) else None


def read_stored_png(
    data: bytes, entry: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """A protected or recovered PNG of the owner commands, checked against its entry.

    Args:
        data: the PNG file's bytes.
        entry: its manifest entry (``mode``, ``width``, ``height``).

    Returns:
        (planes, alpha, label): (3, H, W) uint8 (``RGB``/``RGBA`` files) or (1, H, W)
        (``L``/``LA``, a grayscale key's), the (H, W) alpha plane or None, and the class
        name of the ``raeg:label`` text chunk or None.

    Raises:
        ImageDecodeError: the image's mode or size differ from the entry.
    """
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        mode = im.mode
        label = im.text.get(LABEL_CHUNK) if hasattr(im, "text") else None
        arr = np.asarray(im)
    if mode != entry.get("mode") or arr.shape[:2] != (entry["height"], entry["width"]):
        raise ImageDecodeError(
            f"stored image is {mode} {arr.shape[1]}x{arr.shape[0]}, manifest says "
            f"{entry.get('mode')} {entry['width']}x{entry['height']}"
        )
    if arr.ndim == 2:
        arr = arr[:, :, None]
    colours = 1 if mode in ("L", "LA") else 3
    alpha = arr[:, :, colours].copy() if mode in ("RGBA", "LA") else None
    return np.ascontiguousarray(arr[:, :, :colours].transpose(2, 0, 1)), alpha, label
