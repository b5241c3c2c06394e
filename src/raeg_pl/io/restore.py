"""``restore_folder``: invert a protected folder with its key (see :mod:`raeg_pl.io.owner`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raeg_pl.io.apply import apply_protector, protector_values
from raeg_pl.io.labels import label_problem
from raeg_pl.io.manifest import (
    MANIFEST,
    FolderError,
    KeyMismatchError,
    new_manifest,
    protector_fingerprint,
    read_json,
    read_manifest,
)
from raeg_pl.io.owner import (
    DEFAULT_MAX_BATCH_PIXELS,
    Batcher,
    Key,
    OwnerRun,
    check_apart,
    check_layout,
    load_owner_key,
    resolve_path,
    torch_device,
)
from raeg_pl.io.reader import pixel_sha256, read_error, read_source_bytes, read_stored_png
from raeg_pl.io.sidecar import SIDECAR_INDEX, decode_residual, default_sidecar_dir
from raeg_pl.io.summary import FolderSummary
from raeg_pl.io.verify import find_moved, label_checks, present_files
from raeg_pl.io.writer import encode_png
from raeg_pl.utils.files import sha256_bytes, sha256_file

__all__ = ["restore_folder"]


def find_sidecar_dir(
    src: Path, entries: dict[str, dict[str, Any]], sidecar_dir: Any, find: bool
) -> tuple[Path | None, str | None]:
    """(the sidecar folder to use or None, a note for the report)."""
    recorded = any(e.get("sidecar") for e in entries.values())
    if sidecar_dir is not None:
        sc_root = resolve_path(sidecar_dir)
        if not sc_root.is_dir():
            raise FolderError(f"sidecar folder not found: {sc_root}")
        if not recorded:
            raise FolderError(f"{src} was protected without a lossless sidecar")
        return sc_root, None
    if not recorded:
        return None, (
            "approximate restore: the folder was protected without a lossless sidecar, and "
            "8-bit storage of the protected images loses what only a sidecar keeps"
        )
    default = default_sidecar_dir(src)
    if not find:
        return None, (
            "approximate restore, as asked (no sidecar searched for): without the "
            f"lossless sidecar (protect wrote it to {default}) the 8-bit rounding of the "
            "protected images cannot be undone exactly"
        )
    if default.is_dir():
        return default, f"lossless sidecar found at {default}"
    return None, (
        f"approximate restore: no lossless sidecar at {default} (its default place); "
        "without it the 8-bit rounding of the protected images cannot be undone "
        "exactly (pass --sidecar DIR for a bit-exact restore)"
    )


def restore_folder(
    key: Key,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    sidecar_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    progress: bool = True,
    max_batch_pixels: int = DEFAULT_MAX_BATCH_PIXELS,
    find_sidecar: bool = True,
    classes: Sequence[str] | None = None,
) -> FolderSummary:
    """Restores a protected folder into recovered 8-bit PNGs (alpha re-attached).

    The key is checked against the manifest before anything is created. Protected files
    that are missing, modified (hash mismatch), not in the manifest, or whose label or place
    changed (tampered) are reported by name and not restored; the rest are. With a sidecar
    every file is restored bit for bit and checked against the manifest's source pixel hash
    (a mismatch is a failure and nothing is written for that file). Resumable like
    :func:`protect_folder`.

    Args:
        key: key file path, :class:`ProtectorKey` or protector (a conditioned protector
            also needs ``classes``).
        input_dir: a protected folder (with its ``manifest.json``); only read.
        output_dir: recovered folder (created), same relative paths, ``manifest.json`` of
            kind ``recovered``.
        sidecar_dir: the lossless sidecar folder written by protect; default: the one at
            protect's default place (``<input_dir>.sidecar``) when ``find_sidecar``.
        batch_size: images per network call without sidecar (with a sidecar every image is
            restored alone, exactly as protect computed its residual).
        device: torch device.
        progress: show a progress bar.
        max_batch_pixels: pixel budget of one batch.
        find_sidecar: look for the sidecar at its default place (False: approximate
            restore unless ``sidecar_dir`` is given).
        classes: class names of a conditioned protector passed as ``key`` directly.

    Raises:
        KeyMismatchError: the key is not the one the folder was protected with.
        FolderError: refused paths, no or foreign manifest (or a newer format version), an
            unfinished protect run, a sidecar folder for a folder protected without one.
    """
    pkey = load_owner_key(key, classes)
    dev = torch_device(device)
    src, out_root = resolve_path(input_dir), resolve_path(output_dir)
    explicit_sc = resolve_path(sidecar_dir) if sidecar_dir is not None else None
    check_layout(src, out_root, explicit_sc, in_name="protected")
    manifest = read_manifest(src, kind="protected")
    entries: dict[str, dict[str, Any]] = manifest["files"]
    if any("source_pixel_sha256" not in e for e in entries.values()):
        raise FolderError(
            f"{src / MANIFEST}: a pipeline export, not a folder of `raeg protect`; restore it "
            "with the pipeline (its method's recover)"
        )
    fingerprint = pkey.fingerprint
    made_with = protector_fingerprint(manifest)
    if made_with != fingerprint:
        raise KeyMismatchError(
            f"wrong key for {src}: it was protected with key {str(made_with)[:16]}..., "
            f"this key is {fingerprint[:16]}...; nothing written"
        )
    classes_m, level = label_checks(manifest)
    if pkey.conditional and list(pkey.classes) != classes_m:
        raise FolderError(
            f"{src / MANIFEST}: the manifest's classes {classes_m} are not the key's "
            f"{list(pkey.classes)}"
        )
    sc_root, note = find_sidecar_dir(src, entries, sidecar_dir, find_sidecar)
    if sc_root is not None and sc_root != explicit_sc:
        check_apart(out_root, sc_root, "output", "sidecar")
    lossless = sc_root is not None
    index_path = sc_root / SIDECAR_INDEX if lossless else None
    if index_path is not None and index_path.exists():
        made_with = read_json(index_path, "sidecar index").get("key_fingerprint")
        if made_with != fingerprint:
            raise KeyMismatchError(f"{sc_root}: sidecar made with another key")
    net = pkey.net.to(dev)
    run = OwnerRun(
        "restore", "recovered", src, out_root, sc_root, fingerprint, len(entries), progress, False
    )
    summary, folder = run.summary, run.folder
    if note:
        summary.notes.append(note)
    missing, extra = present_files(src, manifest)
    for old, new in find_moved(src, entries, missing, extra).items():
        summary.tampered[old] = f"moved to {new}; not restored (its label may no longer fit)"
        missing.remove(old)
        extra.remove(new)
    summary.missing, summary.extra = missing, extra
    run.open()

    def restore(
        chunk: list[tuple[str, dict[str, Any], str, np.ndarray, Any, bytes | None]],
    ) -> None:
        folder.begin([c[0] for c in chunk], [])
        y = [pkey.classes.index(c[1]["label"]) for c in chunk] if pkey.conditional else None
        tile = chunk[0][1].get("tile", 0)
        x = np.stack([c[3] for c in chunk])
        try:
            if lossless:  # batch 1: the values protect computed the residual from
                values = protector_values(net, x, y, inverse=True, tile=tile, device=dev).numpy()
            else:
                values = apply_protector(
                    net, x, y, inverse=True, tile=tile, batch_size=None, device=dev
                ).numpy()
        except (RuntimeError, MemoryError, ValueError) as e:
            for c in chunk:
                run.fail(c[0], f"restore failed ({type(e).__name__}: {e})")
            return
        for (rel, entry, prot_sha, _, alpha, residual), v in zip(chunk, values):
            if residual is not None:
                try:
                    rgb = decode_residual(residual, v)
                except (ValueError, OSError, EOFError) as e:
                    run.fail(rel, f"sidecar unusable ({e})")
                    continue
            else:
                rgb = v
            pixels = pixel_sha256(rgb.transpose(1, 2, 0), alpha)
            exact = pixels == entry["source_pixel_sha256"]
            if lossless and not exact:
                run.fail(rel, "lossless restore does not match the source pixel hash")
                continue
            png = encode_png(
                rgb, alpha, entry.get("label") if entry.get("label_embedded") else None
            )
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
                "label": entry.get("label"),
                "label_embedded": bool(entry.get("label_embedded")),
            }
            run.store(rel, rel, out_entry, png, None)
        folder.sync()

    batcher = Batcher(1 if lossless else batch_size, max_batch_pixels, restore)
    try:
        for index, rel in enumerate(sorted(entries)):
            entry = entries[rel]
            if rel in summary.tampered or rel in missing:
                run.bar.update(1)
                continue
            try:
                data = read_source_bytes(src / rel)
            except OSError as e:
                run.fail(rel, read_error(e))
                continue
            prot_sha = sha256_bytes(data)
            if prot_sha != entry.get("sha256"):
                summary.modified.append(rel)
                run.bar.update(1)
                continue
            try:
                prot, alpha, embedded = read_stored_png(data, entry)
            except Exception as e:  # a file with the right hash decodes; this is defensive
                run.fail(rel, f"cannot decode protected file ({e})")
                continue
            why = None
            if pkey.conditional or entry.get("label_embedded"):
                why = label_problem(rel, entry, classes_m, level, embedded)
            if why is not None:
                summary.tampered[rel] = f"{why}; not restored"
                run.bar.update(1)
                continue
            rec = folder.records.get(rel)
            if (
                rec is not None
                and rec.get("source_sha256") == prot_sha
                and rec.get("lossless") == lossless
                and folder.intact(rel, rec, need_sidecar=False)
            ):
                run.skip(rel)
                continue
            why = folder.can_write(rel)
            if why is not None:
                run.fail(rel, why)
                continue
            residual = None
            if lossless:
                sc = entry.get("sidecar")
                if not sc:
                    run.fail(rel, "no sidecar recorded for this file")
                    continue
                try:
                    residual = read_source_bytes(sc_root / sc["file"])
                except OSError as e:
                    run.fail(rel, f"sidecar {sc['file']}: {read_error(e)}")
                    continue
                if sha256_bytes(residual) != sc["sha256"]:
                    run.fail(rel, f"sidecar {sc['file']} does not match its recorded hash")
                    continue
            h, w = prot.shape[1:]
            item = (rel, entry, prot_sha, prot, alpha, residual)
            batcher.add(item, h, w, entry.get("tile", 0), index)
        batcher.flush()
        files = {r: e for r, e in sorted(folder.records.items()) if r in entries}
        summary.exact = sum(bool(e.get("exact")) for e in files.values())
        out_manifest = new_manifest(
            "recovered",
            files,
            classes=classes_m,
            source_fingerprint=manifest.get("source_fingerprint"),
            protector_fingerprint=fingerprint,
            key_fingerprint=fingerprint,
            protected_manifest_sha256=sha256_file(src / MANIFEST),
            labels_from=manifest.get("labels_from"),
            label_folder_level=level,
            lossless=lossless,
            num_exact=summary.exact,
            failed=dict(sorted(summary.failed.items())),
            missing=summary.missing,
            modified=summary.modified,
            extra=summary.extra,
            tampered=dict(sorted(summary.tampered.items())),
        )
        run.finish(out_manifest)
    finally:
        run.close()
    return summary
