"""Protect and restore real image folders: the dataset owner's workflow.

:func:`raeg_pl.io.protect.protect_folder` walks an input folder recursively and writes, for
every image, an 8-bit PNG protected by the key's generator at the same relative path in
the output folder, plus its ``manifest.json``; :func:`raeg_pl.io.restore.restore_folder`
inverts a protected folder; :func:`raeg_pl.io.verify.verify_store` checks any such folder
against its manifest. This module holds what protect and restore share: one run skeleton
(:class:`OwnerRun`: output folder, journal, progress, failures, timing), batching, path
and key checks; the two commands differ only in what they compute per batch.

Inputs
    Formats and conversions: :mod:`raeg_pl.io.reader`. The alpha plane is never sent
    through the network and is copied bit for bit into the RGBA output.

Labels
    A label-conditioned key protects each image with its class (:mod:`raeg_pl.io.labels`):
    from the class folders of an ImageFolder input, or from a CSV file. The label is
    recorded in the manifest and in the protected PNG; restore uses the manifest's label
    after cross-checking it, and reports a file whose label or place changed as tampered
    instead of restoring it with the wrong label. An input that cannot be labelled is
    refused before anything is written.

Outputs
    ``IN/a/b.jpg`` -> ``OUT/a/b.png`` (collisions: :func:`raeg_pl.io.reader.plan_output_names`).
    Images larger than ``tile`` (default 1024) on either side are protected tile by tile
    (the tile size is recorded per file, and restore uses the same grid).

Safety
    Nothing is ever written inside ``IN``; ``OUT == IN``, ``OUT`` inside ``IN`` and ``IN``
    inside ``OUT`` are refused (and the same for the sidecar folder). A file in ``OUT`` that
    this tool did not create is never overwritten. Writes are atomic and journalled, and a
    rerun resumes (:class:`raeg_pl.io.writer.OutputFolder`).

Lossless sidecar
    With ``lossless=True`` every protected image also gets a residual file
    ``SIDECAR/<output>.res`` (default ``SIDECAR = OUT.sidecar``, outside ``OUT``: only
    authorised users receive it; coding in :mod:`raeg_pl.io.sidecar`). Restore looks for it
    there by default and then reproduces the original pixels bit for bit, checked against
    the manifest's source pixel hash; without it, restore says that it is approximate.

The pixel hashes in a manifest (``source_pixel_sha256``) are SHA-256 digests of the
original pixels: they reveal nothing beyond letting someone who already holds a candidate
image confirm it is the original.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from raeg_pl.io.keyfile import ProtectorKey, read_key
from raeg_pl.io.manifest import (
    FolderError,
)
from raeg_pl.io.summary import FolderSummary
from raeg_pl.io.writer import OutputFolder
from raeg_pl.models.protector import InvertibleProtector

__all__ = [
    "DEFAULT_MAX_BATCH_PIXELS",
    "DEFAULT_TILE",
    "Batcher",
    "OwnerRun",
    "check_apart",
    "check_layout",
    "load_owner_key",
    "resolve_path",
    "sidecar_totals",
    "torch_device",
]

DEFAULT_TILE = 1024
DEFAULT_MAX_BATCH_PIXELS = 1 << 22  # 4 Mpx of pending decoded images per batch
SLOW_ENV = "RAEG_TEST_SLOW_MS"  # test hook: sleep this many ms after each protected file

Key = ProtectorKey | InvertibleProtector | str | os.PathLike


def resolve_path(path: str | os.PathLike) -> Path:
    """The absolute, symlink-free form of a user-given path (``~`` expanded)."""
    return Path(path).expanduser().resolve()


def check_apart(a: Path, b: Path, name_a: str, name_b: str) -> None:
    """Refuses ``a == b``, ``a`` inside ``b`` and ``b`` inside ``a`` (resolved paths)."""
    if a == b:
        raise FolderError(f"{name_a} and {name_b} are the same folder: {a}")
    if a.is_relative_to(b):
        raise FolderError(f"{name_a} {a} is inside {name_b} {b}")
    if b.is_relative_to(a):
        raise FolderError(f"{name_b} {b} is inside {name_a} {a}")


def check_layout(src: Path, out: Path, sidecar: Path | None, in_name: str = "input") -> None:
    """Refuses a missing input, non-folder outputs and folders nested in one another."""
    if not src.is_dir():
        raise FolderError(f"{in_name} folder not found: {src}")
    for name, path in (("output", out), ("sidecar", sidecar)):
        if path is not None and path.exists() and not path.is_dir():
            raise FolderError(f"{name} {path} exists and is not a folder")
    check_apart(src, out, in_name, "output")
    if sidecar is not None:
        check_apart(src, sidecar, in_name, "sidecar")
        check_apart(out, sidecar, "output", "sidecar")


def load_owner_key(key: Key, classes: Sequence[str] | None) -> ProtectorKey:
    """The key as a :class:`ProtectorKey` (a bare network takes ``classes``)."""
    if isinstance(key, ProtectorKey):
        return key
    if isinstance(key, torch.nn.Module):
        if key.conditional and (classes is None or len(classes) != key.num_classes):
            raise FolderError(
                f"the protector is conditioned on {key.num_classes} classes: pass their names "
                "(classes=[...]) or use a key file, which carries them"
            )
        names = tuple(classes) if key.conditional and classes is not None else ()
        return ProtectorKey(key.eval(), names, Path("<protector>"))
    return read_key(key)


def torch_device(device: str | torch.device) -> torch.device:
    """The requested device; :class:`FolderError` when it is unknown or unavailable."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise FolderError(f"unknown device {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FolderError(f"device {device!r} requested but CUDA is not available")
    return dev


def sidecar_totals(entries: dict[str, dict[str, Any]]) -> tuple[int | None, float | None]:
    """(bytes, bits per pixel) of the sidecar residuals of manifest entries (None: none)."""
    sized = [e for e in entries.values() if e.get("sidecar")]
    if not sized:
        return None, None
    nbytes = sum(e["sidecar"]["bytes"] for e in sized)
    pixels = sum(e["width"] * e["height"] for e in sized)
    return nbytes, 8.0 * nbytes / max(1, pixels)


class Batcher:
    """Holds pending images until a batch is due, then runs it, grouped by size.

    At most ``batch_size`` images or about ``max_pixels`` pixels are pending at any time,
    so memory does not depend on the number of files. Images larger than the tile size are
    run alone.
    """

    def __init__(self, batch_size: int, max_pixels: int, run: Callable[[list[Any]], None]) -> None:
        self.batch_size, self.max_pixels, self.run = max(1, batch_size), max_pixels, run
        self.items: list[Any] = []
        self.pixels = 0

    def add(self, item: Any, h: int, w: int, tile: int, index: int) -> None:
        group = ("alone", index) if tile and (h > tile or w > tile) else (h, w, tile)
        self.items.append((group, item))
        self.pixels += h * w
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


class OwnerRun:
    """One protect or restore run: its output folder, summary, progress bar and timing."""

    def __init__(
        self,
        command: str,
        kind: str,
        src: Path,
        out: Path,
        sidecar: Path | None,
        fingerprint: str,
        total: int,
        progress: bool,
        write_sidecar: bool,
    ) -> None:
        from tqdm.auto import tqdm

        self.t0 = time.perf_counter()
        self.folder = OutputFolder(out, kind, fingerprint, sidecar if write_sidecar else None)
        self.summary = FolderSummary(
            command, str(src), str(out), str(sidecar) if sidecar else None, total=total
        )
        self.bar = tqdm(total=total, desc=command, unit="img", disable=not progress)
        self.slow = float(os.environ.get(SLOW_ENV) or 0) / 1000.0

    def open(self) -> None:
        """Opens the output folder (lock, journal, temporary files of an earlier run)."""
        self.folder.open()
        self.summary.removed_temp_files = self.folder.removed_temp_files

    def fail(self, rel: str, reason: str) -> None:
        """Records that an input failed, and why."""
        self.summary.failed[rel] = reason
        self.bar.update(1)

    def skip(self, rel: str) -> None:
        """Records an input whose output from an earlier run is still intact."""
        self.summary.skipped.append(rel)
        self.bar.update(1)

    def store(
        self, rel: str, out_rel: str, entry: dict, png: bytes, residual: bytes | None
    ) -> None:
        """Writes one output (and its sidecar residual) and records it as done."""
        try:
            if residual is not None:
                self.folder.write_sidecar(entry["sidecar"]["file"], residual)
            self.folder.write(out_rel, png)
        except OSError as e:
            self.fail(rel, f"cannot write output ({type(e).__name__}: {e.strerror or e})")
            return
        self.folder.done(out_rel, entry)
        self.summary.written.append(rel)
        self.bar.update(1)
        if self.slow:
            time.sleep(self.slow)

    def finish(self, manifest: dict[str, Any], index: dict[str, Any] | None = None) -> None:
        """Writes the manifest (and the sidecar index) and drops the journal."""
        self.bar.close()
        self.summary.manifest = str(self.folder.finish(manifest, index))

    def close(self) -> FolderSummary:
        """Releases the folder and returns the summary with its timing."""
        self.bar.close()
        self.folder.close()
        self.summary.seconds = time.perf_counter() - self.t0
        self.summary.images_per_s = len(self.summary.written) / max(self.summary.seconds, 1e-9)
        return self.summary
