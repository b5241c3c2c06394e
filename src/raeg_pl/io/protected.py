"""Protected-dataset files: the only place that writes or reads exported image folders.

An export is an ImageFolder tree of 8-bit PNGs plus ``manifest.json``::

    <out>/train/<class>/<name>.png
    <out>/manifest.json   kind (clean | protected | recovered), per-file SHA-256 and source,
                          protector fingerprint, source fingerprint, config, tool version

Every file is written atomically (temporary file in the same folder, then rename) and the
manifest last, so a folder with a manifest is complete; an interrupted export is simply run
again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import raeg_pl
from raeg_pl.utils.files import sha256_bytes, sha256_file, write_atomic, write_atomic_text

MANIFEST = "manifest.json"
Transform = Callable[[torch.Tensor], torch.Tensor]


def tensor_fingerprint(images: torch.Tensor, labels: torch.Tensor | None = None) -> str:
    """SHA-256 of uint8 image tensors (and labels): identifies the pixels that were protected."""
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.contiguous().numpy().tobytes())
    if labels is not None:
        h.update(labels.numpy().astype(np.int64).tobytes())
    return h.hexdigest()


def png_bytes(image: torch.Tensor) -> bytes:
    """Encodes one image (C, H, W) uint8 as PNG."""
    arr = image.permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def read_png(path: Path) -> torch.Tensor:
    """Reads an 8-bit image file as (C, H, W) uint8."""
    with Image.open(path) as im:
        arr = np.array(im)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _apply(transform: Transform | None, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    if transform is None:
        return images
    with torch.no_grad():
        out = transform(images.to(device).float() / 255)
    return (out.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def write_image_folder(
    out_dir: str | os.PathLike,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: list[str],
    files: list[str],
    kind: str,
    transform: Transform | None = None,
    split: str = "train",
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes images, optionally transformed, as an 8-bit PNG ImageFolder with a manifest.

    Args:
        out_dir: export folder (created).
        images: (N, C, H, W) uint8 source images.
        labels: (N,) class indices into ``classes``.
        classes: class names; folder names of the export.
        files: (N,) source paths relative to the split folder (``<class>/<name>.<ext>``);
            outputs keep the relative path with a ``.png`` suffix.
        kind: ``"clean"``, ``"protected"`` or ``"recovered"``.
        transform: batch function on float images in [0, 1] (protector forward or inverse);
            its output is rounded to 8 bits. None copies the pixels.
        split: split folder name inside ``out_dir``.
        batch_size: images per transform batch.
        device: device of the transform.
        extra: more manifest fields (protector fingerprint, config...).

    Returns:
        The manifest dict (also written to ``<out_dir>/manifest.json``, last).
    """
    out_dir = Path(out_dir)
    device = torch.device(device)
    entries: dict[str, dict[str, Any]] = {}

    def save(i: int, image: torch.Tensor) -> tuple[str, dict[str, Any]]:
        rel = str(Path(split) / Path(files[i]).with_suffix(".png"))
        data = png_bytes(image)
        write_atomic(out_dir / rel, data)
        return rel, {
            "sha256": sha256_bytes(data),
            "source": files[i],
            "label": classes[int(labels[i])],
        }

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        for start in range(0, len(images), batch_size):
            batch = _apply(transform, images[start : start + batch_size], device)
            jobs = [(start + j, batch[j]) for j in range(len(batch))]
            for rel, entry in pool.map(lambda job: save(*job), jobs):
                entries[rel] = entry
    manifest = {
        "kind": kind,
        "tool_version": raeg_pl.__version__,
        "num_images": len(entries),
        "classes": list(classes),
        "source_fingerprint": tensor_fingerprint(images, labels),
        **(extra or {}),
        "files": entries,
    }
    write_atomic_text(out_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an export; a clear error when it is missing or unreadable."""
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no manifest (not an export, or an unfinished one)") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: manifest is not valid JSON ({e})") from e


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether an export folder has its manifest (written last)."""
    return (Path(folder) / MANIFEST).is_file()


def verify_folder(folder: str | os.PathLike) -> dict[str, list[str]]:
    """Checks files against the manifest: ``{"missing", "modified", "extra"}`` relative paths."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    listed = manifest["files"]
    present = {str(p.relative_to(folder)) for p in folder.rglob("*.png")}
    missing = sorted(r for r in listed if r not in present)
    modified = sorted(
        r for r in listed if r in present and sha256_file(folder / r) != listed[r]["sha256"]
    )
    extra = sorted(present - set(listed))
    return {"missing": missing, "modified": modified, "extra": extra}


def load_export(
    folder: str | os.PathLike, check: bool = True
) -> tuple[torch.Tensor, torch.Tensor, list[str], list[str], dict[str, Any]]:
    """Reads an export back: (images uint8 (N, C, H, W), labels, classes, relative paths, manifest).

    Raises:
        ValueError: with ``check``, when any file is missing or differs from its manifest hash.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if check:
        problems = verify_folder(folder)
        bad = {k: v for k, v in problems.items() if v and k != "extra"}
        if bad:
            raise ValueError(
                f"{folder}: export does not match its manifest: "
                + "; ".join(f"{k}: {v[:5]}{'...' if len(v) > 5 else ''}" for k, v in bad.items())
            )
    rels = sorted(manifest["files"])
    classes = list(manifest["classes"])
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        images = list(pool.map(lambda r: read_png(folder / r), rels))
    labels = torch.tensor([classes.index(manifest["files"][r]["label"]) for r in rels])
    return torch.stack(images), labels, classes, rels, manifest
