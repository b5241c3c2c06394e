"""The one manifest schema of image folders written by raeg_pl, and reading it back.

Every folder the store writes (a pipeline export, an owner's protected or restored folder)
ends with ``manifest.json``, written last, atomically::

    {
      "format": "raeg-folder", "format_version": 2,
      "kind": "clean" | "protected" | "recovered",
      "tool_version": "0.1.0",
      "num_images": N,
      "classes": [...],                  # label names ([] when the images are unlabelled)
      "source_fingerprint": "<sha256>",  # the source pixels (pipeline) or files (owner)
      "protector_fingerprint": "<sha256>" | null,
      "files": {"<relative path>": {"sha256": ..., "source": ..., "label": ... | null, ...}},
      ...                                # writer-specific fields (config, sidecar totals...)
    }

Older manifests are still read: pipeline exports written before ``format`` existed
(version 0 here) and owner folders of format version 1 (``key_fingerprint`` instead of
``protector_fingerprint``, no labels). A newer ``format_version`` is refused with an error
naming the file and the version.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import raeg_pl

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "JOURNAL",
    "MANIFEST",
    "FolderError",
    "KeyMismatchError",
    "ManifestError",
    "ManifestNotFoundError",
    "manifest_text",
    "manifest_version",
    "new_manifest",
    "protector_fingerprint",
    "read_json",
    "read_manifest",
    "source_files_fingerprint",
]

MANIFEST = "manifest.json"
JOURNAL = ".raeg-journal.jsonl"
FORMAT = "raeg-folder"
FORMAT_VERSION = 2
KINDS = ("clean", "protected", "recovered")


class FolderError(ValueError):
    """A refused request (bad paths, wrong key, foreign or unfinished folder); nothing done."""


class KeyMismatchError(FolderError):
    """The key's fingerprint is not the one a protected folder was made with."""


class ManifestError(FolderError):
    """A manifest that cannot be used; the message names the file and the reason."""


class ManifestNotFoundError(ManifestError, FileNotFoundError):
    """A folder without its manifest (not a raeg folder, or an unfinished run)."""


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; :class:`ManifestError` naming the file otherwise."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path}: unreadable {what} ({e})") from e
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: not a {what} (a JSON object was expected)")
    return data


def manifest_version(manifest: dict[str, Any], path: Path | str = MANIFEST) -> int:
    """The format version of a manifest dict: 0 (pipeline export before 2), 1 or 2.

    Raises:
        ManifestError: not a raeg manifest, or a version this raeg_pl does not read.
    """
    fmt = manifest.get("format")
    if fmt is None:
        if isinstance(manifest.get("files"), dict) and manifest.get("kind") in KINDS:
            return 0
        raise ManifestError(f"{path}: not a raeg folder manifest (no 'format', 'kind', 'files')")
    if fmt != FORMAT:
        raise ManifestError(f"{path}: not a raeg folder manifest (format {fmt!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ManifestError(f"{path}: manifest format_version {version!r} is not a version")
    if version > FORMAT_VERSION:
        raise ManifestError(
            f"{path}: manifest format_version {version} is newer than this raeg_pl "
            f"({raeg_pl.__version__}) reads (up to {FORMAT_VERSION}); upgrade raeg_pl"
        )
    if not isinstance(manifest.get("files"), dict):
        raise ManifestError(f"{path}: manifest (format_version {version}) has no 'files' table")
    return version


def read_manifest(folder: str | os.PathLike, kind: str | None = None) -> dict[str, Any]:
    """The manifest of a folder written by raeg_pl (any version it reads).

    Args:
        folder: the folder holding ``manifest.json``.
        kind: when given, the folder must be of this kind.

    Raises:
        ManifestNotFoundError: no manifest (an unfinished run when a journal is there).
        ManifestError: unreadable, not ours, a newer format version, or another kind.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        if (folder / JOURNAL).exists():
            raise ManifestNotFoundError(
                f"{folder}: unfinished run (journal, no manifest); run it again"
            )
        raise ManifestNotFoundError(
            f"{path}: no manifest (not a raeg folder, or an unfinished export)"
        )
    manifest = read_json(path, "manifest")
    version = manifest_version(manifest, path)
    if kind is not None and manifest.get("kind") != kind:
        raise ManifestError(
            f"{path}: folder kind is {manifest.get('kind')!r}, expected {kind!r} "
            f"(format_version {version})"
        )
    return manifest


def protector_fingerprint(manifest: dict[str, Any]) -> str | None:
    """The fingerprint of the protector a folder was made with (any manifest version)."""
    return manifest.get("protector_fingerprint") or manifest.get("key_fingerprint")


def source_files_fingerprint(entries: dict[str, dict[str, Any]]) -> str:
    """SHA-256 over the sorted (source path, source file hash, label) of manifest entries."""
    h = hashlib.sha256(b"raeg-sources/1\n")
    for e in sorted(entries.values(), key=lambda e: str(e.get("source"))):
        h.update(
            json.dumps([e.get("source"), e.get("source_sha256"), e.get("label")]).encode() + b"\n"
        )
    return h.hexdigest()


def new_manifest(
    kind: str,
    files: dict[str, dict[str, Any]],
    *,
    classes: list[str] | tuple[str, ...] = (),
    source_fingerprint: str | None = None,
    protector_fingerprint: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """A current-version manifest dict (``fields`` are the writer's own top-level fields)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "tool_version": raeg_pl.__version__,
        "num_images": len(files),
        "classes": list(classes),
        "source_fingerprint": source_fingerprint,
        "protector_fingerprint": protector_fingerprint,
        **fields,
        "files": files,
    }


def manifest_text(manifest: dict[str, Any]) -> str:
    """The manifest's file contents (sorted keys, so equal manifests are equal bytes)."""
    return json.dumps(manifest, indent=1, sort_keys=True) + "\n"
