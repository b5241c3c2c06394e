"""Pipeline exports: ImageFolder trees of 8-bit PNGs with the store's manifest.

An export is::

    <out>/train/<class>/<name>.png
    <out>/manifest.json   format 2 (:mod:`raeg_pl.io.manifest`): kind (clean | protected |
                          recovered), per-file SHA-256, source and label, protector and
                          source fingerprints, config, tool version

Every file is written atomically (temporary file in the same folder, then rename) and the
manifest last, so a folder with a manifest is complete; an interrupted export is simply run
again. Exports written before format 2 (no ``format`` field) are still read and verified.

Under ``torch.distributed`` (DDP, ``torchrun``, ``srun``) :func:`write_image_folder` is a
collective: each rank transforms and writes only its share of the images, the per-file
records are gathered, and rank 0 alone writes the manifest, after every rank's files are in
place. The folder is byte-for-byte the one a single process writes.

The protector is applied by :func:`raeg_pl.io.apply.apply_protector`, images are read and
written by :mod:`raeg_pl.io.reader` / :mod:`raeg_pl.io.writer`, and checked by the one
verifier, :func:`raeg_pl.io.verify.verify_store`.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from raeg_pl.io.apply import apply_protector
from raeg_pl.io.manifest import MANIFEST, manifest_text, new_manifest
from raeg_pl.io.manifest import read_manifest as _read_store_manifest
from raeg_pl.io.reader import read_png
from raeg_pl.io.verify import verify_store
from raeg_pl.io.writer import encode_png
from raeg_pl.utils.files import sha256_bytes, sha256_file, write_atomic, write_atomic_text

__all__ = [
    "MANIFEST",
    "is_complete",
    "load_export",
    "png_bytes",
    "read_manifest",
    "read_png",
    "sha256_file",
    "tensor_fingerprint",
    "verify_folder",
    "write_image_folder",
]


def png_bytes(image: torch.Tensor) -> bytes:
    """Encodes one image (C, H, W) uint8 as PNG (:func:`raeg_pl.io.writer.encode_png`)."""
    return encode_png(image)


def tensor_fingerprint(images: torch.Tensor, labels: torch.Tensor | None = None) -> str:
    """SHA-256 of uint8 image tensors (and labels): identifies the pixels that were protected."""
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.contiguous().numpy().tobytes())
    if labels is not None:
        h.update(labels.numpy().astype(np.int64).tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------- pipeline exports
Transform = Any  # a protector, its bound forward / inverse, or a function of float images


def _transform_fingerprint(transform: Transform | None) -> str | None:
    owner = getattr(transform, "__self__", transform)
    fingerprint = getattr(owner, "fingerprint", None)
    return fingerprint() if callable(fingerprint) else None


def _shard(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """This process's (rank, world size): the arguments, else the default process group's."""
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised and world_size > 1 else 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if world_size > 1:
        # The records are gathered through the default group, so it must be this world.
        if not initialised:
            raise RuntimeError(
                f"a sharded export (world_size={world_size}) needs an initialised "
                "torch.distributed process group"
            )
        if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
            raise ValueError(
                f"rank {rank} / world_size {world_size} differ from the process group's "
                f"{dist.get_rank()} / {dist.get_world_size()}"
            )
    return rank, world_size


def _output_paths(files: list[str], split: str) -> list[str]:
    """Relative output path of each source file; two sources may not share one."""
    rels = [str(Path(split) / Path(f).with_suffix(".png")) for f in files]
    if len(set(rels)) != len(rels):
        seen: dict[str, str] = {}
        clashes = []
        for rel, f in zip(rels, files):
            if rel in seen:
                clashes.append(f"{seen[rel]} and {f} -> {rel}")
            seen.setdefault(rel, f)
        raise ValueError(
            f"{len(clashes)} output paths are shared by two source files (each would "
            f"overwrite the other): {clashes[:5]}"
        )
    return rels


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
    rank: int | None = None,
    world_size: int | None = None,
) -> dict[str, Any]:
    """Writes images, optionally transformed, as an 8-bit PNG ImageFolder with a manifest.

    With more than one process (``world_size > 1``, by default whenever a
    ``torch.distributed`` process group is initialised) this is a collective that every rank
    of the default group calls with the same arguments: rank ``r`` transforms and writes the
    batches ``r, r + world_size, ...`` of ``batch_size`` images, every file is written by
    exactly one rank, and rank 0 writes the manifest from the gathered per-file records
    once all ranks have written theirs. Whole batches are the unit of sharding so that the
    transform sees the same batches as in a single process, and the files and the manifest
    are byte-identical to a single-process export of the same data on the same hardware.
    The ranks' inputs are compared first (a fingerprint of the pixels, labels, paths and
    ``extra``), and an error on any rank is raised on every rank, so a mismatch or a failure
    never leaves the others waiting or writes a manifest.

    Args:
        out_dir: export folder (created).
        images: (N, C, H, W) uint8 source images (all N on every rank).
        labels: (N,) class indices into ``classes``.
        classes: class names; folder names of the export.
        files: (N,) source paths relative to the split folder (``<class>/<name>.<ext>``);
            outputs keep the relative path with a ``.png`` suffix, which must be unique.
        kind: ``"clean"``, ``"protected"`` or ``"recovered"``.
        transform: batch function on float images in [0, 1] (protector forward or inverse);
            its output is rounded to 8 bits. None copies the pixels. A label-conditioned
            protector, or its bound ``inverse``, also gets each batch's labels.
        split: split folder name inside ``out_dir``.
        batch_size: images per transform batch (and per shard unit under distribution).
        device: device of the transform (this rank's device under distribution).
        extra: more manifest fields (protector fingerprint, config...).
        rank: this process's rank; default the process group's (0 without one).
        world_size: number of writing processes; default the process group's size (1
            without one). ``world_size=1`` writes everything from this process alone, e.g.
            from rank 0 only.

    Returns:
        The manifest dict (also written to ``<out_dir>/manifest.json``, last), the same on
        every rank.

    Raises:
        ValueError: two source files map to one output path, the ranks' inputs differ, or
            ``rank`` / ``world_size`` disagree with the process group.
        RuntimeError: writing failed on some rank (raised on every rank).
    """
    out_dir = Path(out_dir)
    device = torch.device(device)
    rank, world = _shard(rank, world_size)
    fingerprint = tensor_fingerprint(images, labels)
    if world > 1:
        plan = hashlib.sha256(
            json.dumps(
                [fingerprint, list(files), list(classes), kind, split, batch_size, extra],
                sort_keys=True,
            ).encode()
        ).hexdigest()
        plans: list[Any] = [None] * world
        dist.all_gather_object(plans, plan)
        if len(set(plans)) > 1:
            raise ValueError(
                f"{out_dir}: the ranks were given different images, paths or metadata to "
                f"export (input digests {[p[:12] for p in plans]})"
            )
    rels = _output_paths(files, split)

    def save(i: int, image: torch.Tensor) -> tuple[int, str, dict[str, Any]]:
        data = encode_png(image)
        # mkstemp names are unique across processes: ranks never share a temporary file.
        write_atomic(out_dir / rels[i], data)
        return (
            i,
            rels[i],
            {
                "sha256": sha256_bytes(data),
                "source": files[i],
                "label": classes[int(labels[i])],
            },
        )

    records: list[tuple[int, str, dict[str, Any]]] = []
    failure: BaseException | None = None
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            starts = range(0, len(images), batch_size)
            for start in list(starts)[rank::world]:
                stop = start + batch_size
                batch = images[start:stop]
                if transform is not None:
                    batch = apply_protector(
                        transform, batch, labels[start:stop], batch_size=None, device=device
                    )
                jobs = [(start + j, batch[j]) for j in range(len(batch))]
                records += pool.map(lambda job: save(*job), jobs)
    except Exception as e:
        if world == 1:
            raise
        failure = e
    if world > 1:
        # Gathering is also the barrier: every rank's files are in place once it returns.
        shards: list[Any] = [None] * world
        dist.all_gather_object(
            shards, (records, None if failure is None else f"{type(failure).__name__}: {failure}")
        )
        errors = [f"rank {r}: {err}" for r, (_, err) in enumerate(shards) if err]
        if errors:
            raise RuntimeError(f"{out_dir}: export failed; " + "; ".join(errors)) from failure
        records = sorted((rec for recs, _ in shards for rec in recs), key=lambda rec: rec[0])
    entries = {rel: entry for _, rel, entry in records}
    fields = dict(extra or {})
    source_fp = fields.pop("source_fingerprint", fingerprint)
    made_with = fields.pop("protector_fingerprint", None) or _transform_fingerprint(transform)
    manifest = new_manifest(
        kind,
        entries,
        classes=list(classes),
        source_fingerprint=source_fp,
        protector_fingerprint=made_with,
        # Class-folder sources (``<class>/...``) give ``<split>/<class>/...`` outputs, whose
        # folder the verifier cross-checks with the label; other layouts are not checked.
        label_folder_level=1
        if all(e["label"] == rel.split("/")[1] for rel, e in entries.items())
        else None,
        **fields,
    )
    text = manifest_text(manifest)
    if world == 1:
        write_atomic_text(out_dir / MANIFEST, text)
        return manifest
    status: list[str | None] = [None]
    if rank == 0:
        try:
            write_atomic_text(out_dir / MANIFEST, text)
        except Exception as e:
            failure, status[0] = e, f"{type(e).__name__}: {e}"
    # Also the final barrier: no rank returns (and, say, reads the export back) before the
    # manifest exists, and a failure to write it is raised on every rank.
    dist.broadcast_object_list(status, src=0)
    if status[0] is not None:
        raise RuntimeError(f"{out_dir}: writing the manifest failed: {status[0]}") from failure
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of an export (any version the store reads).

    Raises:
        FileNotFoundError: no manifest (a :class:`raeg_pl.io.manifest.ManifestNotFoundError`).
        ValueError: unreadable, not a raeg manifest, or a newer format version; the message
            names the file.
    """
    return _read_store_manifest(folder)


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether an export folder has its manifest (written last)."""
    return (Path(folder) / MANIFEST).is_file()


def verify_folder(folder: str | os.PathLike) -> dict[str, list[str]]:
    """Checks files against the manifest: ``{"missing", "modified", "extra"}`` relative paths.

    Files whose label disagrees with their class folder, or that were moved, count as
    modified (see :func:`raeg_pl.io.verify.verify_store` for the full report).
    """
    summary = verify_store(folder, find_sidecar=False)
    return {
        "missing": summary.missing,
        "modified": sorted(set(summary.modified) | set(summary.tampered) | set(summary.failed)),
        "extra": summary.extra,
    }


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
