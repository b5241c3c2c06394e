"""Writing image folders: PNG encoding, atomic files and the resume journal.

Every file is written to a temporary name in its folder and renamed into place, and the
manifest is written last, so a folder with a manifest is complete.

* :class:`OutputFolder` is an owner-command output under construction: a journal
  (``.raeg-journal.jsonl``, fsynced per batch) records the outputs a batch is about to write
  (``begin``) and each finished file with its manifest entry (``done``); a rerun after an
  interruption resumes from it; a lock refuses two concurrent runs; files this tool did not
  write are never overwritten; :meth:`OutputFolder.finish` writes the manifest and drops
  the journal.
* :func:`raeg_pl.io.protected.write_image_folder` writes pipeline exports with the same
  atomic writes, sharded over ``torch.distributed`` ranks.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin

import raeg_pl
from raeg_pl.io.manifest import (
    FORMAT,
    JOURNAL,
    MANIFEST,
    FolderError,
    KeyMismatchError,
    manifest_text,
    manifest_version,
    protector_fingerprint,
    read_json,
)
from raeg_pl.io.reader import LABEL_CHUNK, walk_files
from raeg_pl.io.sidecar import SIDECAR_INDEX
from raeg_pl.utils.files import sha256_file, write_atomic

try:  # POSIX only; without it concurrent runs on one output folder are not detected
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "TMP_PREFIX",
    "TMP_SUFFIX",
    "OutputFolder",
    "encode_png",
    "remove_temp_files",
    "write_atomic_owned",
]

TMP_PREFIX = ".raeg-tmp-"
TMP_SUFFIX = ".part"


def encode_png(
    image: torch.Tensor | np.ndarray, alpha: np.ndarray | None = None, label: str | None = None
) -> bytes:
    """8-bit PNG bytes of one image.

    Args:
        image: (C, H, W) uint8, C in {1, 3, 4}.
        alpha: optional (H, W) uint8 alpha plane appended to a 3-channel image.
        label: class name stored in a ``raeg:label`` text chunk (covered by the file hash).
    """
    arr = image.numpy() if torch.is_tensor(image) else np.asarray(image)
    if alpha is not None:
        arr = np.concatenate([arr, alpha[None]], axis=0)
    arr = np.ascontiguousarray(arr.transpose(1, 2, 0))
    info = None
    if label is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(LABEL_CHUNK, label)
    buf = io.BytesIO()
    # compress_level=1: protected images are noisy and higher levels cost much more time
    # for a few percent.
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(
        buf, format="PNG", compress_level=1, pnginfo=info
    )
    return buf.getvalue()


def write_atomic_owned(path: Path, data: bytes, fsync: bool = False) -> None:
    """Atomic write whose temporary name carries the reserved prefix (see remove_temp_files)."""
    write_atomic(path, data, fsync=fsync, prefix=TMP_PREFIX, suffix=TMP_SUFFIX)


def remove_temp_files(root: Path) -> int:
    """Deletes the temporary files an interrupted run left under ``root``; their count."""
    removed = 0
    if root.is_dir():
        for rel in walk_files(root):
            name = PurePosixPath(rel).name
            if name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX):
                (root / rel).unlink(missing_ok=True)
                removed += 1
    return removed


class OutputFolder:
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
        made_with = protector_fingerprint(header)
        if made_with != self.fingerprint:
            raise KeyMismatchError(
                f"{where}: started with another key (fingerprint "
                f"{str(made_with)[:16]}..., this key {self.fingerprint[:16]}...)"
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
            manifest = read_json(manifest_path, "manifest")
            if manifest.get("format") != FORMAT:
                raise FolderError(f"{manifest_path}: exists and was not written by raeg")
            manifest_version(manifest, manifest_path)
            self._check_header(manifest, manifest_path)
        if self.sidecar_root is not None and (self.sidecar_root / SIDECAR_INDEX).exists():
            index = read_json(self.sidecar_root / SIDECAR_INDEX, "sidecar index")
            if index.get("format") != FORMAT or index.get("kind") != "sidecar":
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
        self.removed_temp_files = remove_temp_files(self.root)
        if self.sidecar_root is not None:
            self.removed_temp_files += remove_temp_files(self.sidecar_root)

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
        write_atomic_owned(self.root / rel, data)

    def write_sidecar(self, rel: str, data: bytes) -> None:
        assert self.sidecar_root is not None
        write_atomic_owned(self.sidecar_root / rel, data)

    # -- closing
    def finish(self, manifest: dict[str, Any], sidecar_index: dict[str, Any] | None = None) -> Path:
        """Writes the manifest (and sidecar index) atomically, then drops the journal."""
        text = manifest_text(manifest)
        if sidecar_index is not None and self.sidecar_root is not None:
            index_text = manifest_text(sidecar_index)
            write_atomic_owned(self.sidecar_root / SIDECAR_INDEX, index_text.encode(), fsync=True)
        write_atomic_owned(self.root / MANIFEST, text.encode(), fsync=True)
        (self.root / JOURNAL).unlink(missing_ok=True)
        self.close()
        return self.root / MANIFEST

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None
