"""The one verifier: a folder (and its lossless sidecar) against its manifest.

It serves every folder the store writes, of every manifest version it reads: pipeline
exports, owner-protected and restored folders. Each listed file is checked by SHA-256; a
labelled file's label is cross-checked against its class folder and the label embedded in
the file; a listed file found under another name (moved to another class folder, say) is
reported as tampered by both names.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from raeg_pl.io.labels import label_problem
from raeg_pl.io.manifest import MANIFEST, read_manifest
from raeg_pl.io.reader import embedded_label, read_error, walk_files
from raeg_pl.io.sidecar import default_sidecar_dir
from raeg_pl.io.summary import FolderSummary
from raeg_pl.utils.files import sha256_file

__all__ = ["find_moved", "present_files", "verify_store"]


def present_files(folder: Path, manifest: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(missing, extra) relative paths of a folder against its manifest."""
    present = set(walk_files(folder)) - {MANIFEST}
    listed = set(manifest["files"])
    return sorted(listed - present), sorted(present - listed)


def find_moved(
    folder: Path, entries: dict[str, dict[str, Any]], missing: list[str], extra: list[str]
) -> dict[str, str]:
    """Listed files that now lie elsewhere: ``{listed path: new path}``, matched by SHA-256."""
    wanted: dict[str, str] = {}
    for rel in missing:
        wanted.setdefault(entries[rel]["sha256"], rel)
    moved: dict[str, str] = {}
    if not wanted:
        return moved
    for rel in extra:
        try:
            digest = sha256_file(folder / rel)
        except OSError:
            continue
        if digest in wanted and wanted[digest] not in moved:
            moved[wanted[digest]] = rel
    return moved


def label_checks(manifest: dict[str, Any]) -> tuple[list[str], int | None]:
    """(classes, class-folder level) for the label cross-checks of a manifest's files."""
    return list(manifest.get("classes") or []), manifest.get("label_folder_level")


def verify_store(
    folder: str | os.PathLike,
    sidecar_dir: str | os.PathLike | None = None,
    *,
    find_sidecar: bool = True,
) -> FolderSummary:
    """Checks a folder written by raeg_pl (and optionally a sidecar) against its manifest.

    Args:
        folder: a folder with ``manifest.json`` (any manifest version this raeg_pl reads).
        sidecar_dir: for a protected folder, also check each file's sidecar residual.
        find_sidecar: without ``sidecar_dir``, also check the sidecar at protect's default
            place (``<folder>.sidecar``) when the folder was protected losslessly and it
            is there.

    Returns:
        Summary with ``ok_files``, ``missing``, ``modified``, ``extra`` (files present but
        not listed, including leftovers of an interrupted run) and ``tampered`` (a label
        that disagrees with the class folder or with the label inside the file, a file
        moved to another place); a bad or missing sidecar is listed in ``failed``.

    Raises:
        FolderError: no manifest, not ours, a newer format version, an unfinished run.
    """
    root = Path(folder).expanduser().resolve()
    manifest = read_manifest(root)
    entries = manifest["files"]
    summary = FolderSummary(f"verify {manifest.get('kind')}", str(root), total=len(entries))
    missing, extra = present_files(root, manifest)
    classes, level = label_checks(manifest)
    moved = find_moved(root, entries, missing, extra)
    for old, new in moved.items():
        summary.tampered[new] = f"listed as {old} (label {entries[old].get('label')!r}), moved"
        missing.remove(old)
        extra.remove(new)
    summary.missing, summary.extra = missing, extra
    sc_root = Path(sidecar_dir).expanduser().resolve() if sidecar_dir is not None else None
    lossless = any(e.get("sidecar") for e in entries.values())
    if sc_root is None and find_sidecar and lossless and default_sidecar_dir(root).is_dir():
        sc_root = default_sidecar_dir(root)
    gone = set(missing) | set(moved)
    for rel in sorted(entries):
        entry = entries[rel]
        if rel in gone:
            continue
        try:
            good = sha256_file(root / rel) == entry["sha256"]
        except OSError as e:
            summary.failed[rel] = read_error(e)
            continue
        if not good:
            summary.modified.append(rel)
            continue
        if entry.get("label") is not None or entry.get("label_embedded"):
            embedded = embedded_label(root / rel) if entry.get("label_embedded") else None
            why = label_problem(rel, entry, classes, level, embedded)
            if why is not None:
                summary.tampered[rel] = why
                continue
        sc = entry.get("sidecar")
        if sc_root is not None:
            try:
                if not sc:
                    summary.failed[rel] = "no sidecar recorded"
                    continue
                if sha256_file(sc_root / sc["file"]) != sc["sha256"]:
                    summary.failed[rel] = f"sidecar {sc['file']} modified"
                    continue
            except OSError as e:
                summary.failed[rel] = f"sidecar {sc['file']}: {read_error(e)}"
                continue
        summary.ok_files.append(rel)
    if manifest.get("kind") == "recovered":
        summary.exact = sum(bool(e.get("exact")) for e in entries.values())
    summary.sidecar_bytes = manifest.get("sidecar_bytes")
    summary.sidecar_bits_per_pixel = manifest.get("sidecar_bits_per_pixel")
    if sc_root is not None:
        summary.sidecar_dir = str(sc_root)
    elif lossless:
        summary.notes.append(
            f"lossless sidecar not checked (none at {default_sidecar_dir(root)}; pass --sidecar)"
        )
    return summary
