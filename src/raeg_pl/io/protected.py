"""Protected-dataset files: the only place that writes or reads exported image folders.

An export is an ImageFolder tree of 8-bit PNGs plus ``manifest.json``::

    <out>/train/<class>/<name>.png
    <out>/manifest.json   kind (clean | protected | recovered), per-file SHA-256 and source,
                          protector fingerprint, source fingerprint, config, tool version

Every file is written atomically (temporary file in the same folder, then rename) and the
manifest last, so a folder with a manifest is complete; an interrupted export is simply run
again.

Under ``torch.distributed`` (DDP, ``torchrun``, ``srun``) :func:`write_image_folder` is a
collective: each rank transforms and writes only its share of the images, the per-file
records are gathered, and rank 0 alone writes the manifest, after every rank's files are in
place. The folder is byte-for-byte the one a single process writes.
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
import torch.distributed as dist
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


def _apply(
    transform: Transform | None, images: torch.Tensor, labels: torch.Tensor, device: torch.device
) -> torch.Tensor:
    if transform is None:
        return images
    x = images.to(device).float() / 255
    with torch.no_grad():
        # A label-conditioned protector (or its inverse) also takes the batch's labels.
        owner = getattr(transform, "__self__", transform)
        if getattr(owner, "conditional", False):
            out = transform(x, torch.as_tensor(labels).to(device))
        else:
            out = transform(x)
    return (out.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


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
        data = png_bytes(image)
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
                batch = _apply(transform, images[start:stop], labels[start:stop], device)
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
    manifest = {
        "kind": kind,
        "tool_version": raeg_pl.__version__,
        "num_images": len(entries),
        "classes": list(classes),
        "source_fingerprint": fingerprint,
        **(extra or {}),
        "files": entries,
    }
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
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
