"""``protect_folder``: protect every image of a folder with a key (see :mod:`raeg_pl.io.owner`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from raeg_pl.io.apply import apply_protector, protector_values
from raeg_pl.io.labels import LABELS_FROM_FOLDERS, assign_labels
from raeg_pl.io.manifest import FORMAT, FolderError, new_manifest, source_files_fingerprint
from raeg_pl.io.owner import (
    DEFAULT_MAX_BATCH_PIXELS,
    DEFAULT_TILE,
    Batcher,
    Key,
    OwnerRun,
    check_layout,
    load_owner_key,
    resolve_path,
    sidecar_totals,
    torch_device,
)
from raeg_pl.io.reader import (
    DecodedImage,
    ImageDecodeError,
    decode_image,
    key_planes,
    list_images,
    pixel_sha256,
    plan_output_names,
    read_error,
    read_source_bytes,
    stored_mode,
)
from raeg_pl.io.sidecar import LOSSLESS_MARGIN, SIDECAR_SUFFIX, default_sidecar_dir, encode_residual
from raeg_pl.io.summary import FolderSummary
from raeg_pl.io.writer import encode_png
from raeg_pl.utils.files import sha256_bytes

__all__ = ["protect_folder"]


def protect_folder(
    key: Key,
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
    labels: str | os.PathLike | Mapping[str, Any] | None = None,
    classes: Sequence[str] | None = None,
    refine_steps: int = 0,
) -> FolderSummary:
    """Protects every image under ``input_dir`` into 8-bit PNGs under ``output_dir``.

    Resumable: run it again after an interruption (or after adding files) and it finishes
    the rest. See :mod:`raeg_pl.io.owner` for labels, naming and safety rules.

    Args:
        key: a key file path, a loaded :class:`ProtectorKey`, or a protector (moved to
            ``device``; a conditioned one also needs ``classes``).
        input_dir: folder of source images; only read. For a label-conditioned key, an
            ImageFolder (``<class>/...``) unless ``labels`` is given.
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
        lossless_margin: see :mod:`raeg_pl.io.sidecar`.
        labels: for a label-conditioned key and a flat folder: a CSV file of
            ``relative_path,class`` lines (class name or index), or such a mapping.
        classes: class names of a conditioned protector passed as ``key`` directly.
        refine_steps: restore-aware rounding of each stored image
            (:func:`raeg_pl.io.apply.restore_aware_rounding`; 0: plain rounding); recorded
            per file, and a resumed run rewrites files stored with another setting.

    Returns:
        The summary; ``summary.failed`` maps input paths to reasons.

    Raises:
        FolderError: refused paths (OUT == IN, one inside the other), an output folder made
            with another key or of another kind, an invalid tile size, inputs a conditioned
            key cannot label; nothing is written.
        KeyFileError: an unusable key file.
    """
    pkey = load_owner_key(key, classes)
    dev = torch_device(device)
    src, out_root = resolve_path(input_dir), resolve_path(output_dir)
    lossless = lossless or sidecar_dir is not None
    sc_root = None
    if lossless:
        sc_root = resolve_path(sidecar_dir) if sidecar_dir else default_sidecar_dir(out_root)
    check_layout(src, out_root, sc_root)
    net = pkey.net
    mult = 2**net.levels
    if tile < 0 or tile % mult:
        raise FolderError(f"tile must be 0 or a positive multiple of {mult}, got {tile}")
    if refine_steps < 0:
        raise FolderError(f"refine_steps must be >= 0, got {refine_steps}")
    images, ignored = list_images(src)
    names, name_failures = plan_output_names(images)
    label_of: dict[str, str] = {}
    labels_from = None
    if pkey.conditional:
        label_of, labels_from = assign_labels(images, pkey.classes, labels, src)
    elif labels is not None:
        raise FolderError(
            f"{pkey.path}: this key is not conditioned on class labels; labels do not apply"
        )
    net = net.to(dev)
    fingerprint = net.fingerprint()
    channels = int(net.config.get("in_channels", 3))
    run = OwnerRun(
        "protect", "protected", src, out_root, sc_root, fingerprint, len(images), progress, True
    )
    run.summary.ignored = ignored
    folder = run.folder

    def protect(chunk: list[tuple[str, str, DecodedImage, dict[str, Any], np.ndarray]]) -> None:
        try:
            x = np.stack([item[-1] for item in chunk])
            y = [pkey.classes.index(m["label"]) for *_, m, _ in chunk] if pkey.conditional else None
            protected = apply_protector(
                net, x, y, tile=tile, batch_size=None, device=dev, refine_steps=refine_steps
            ).numpy()
            results = []
            for k, ((rel, out_rel, img, meta, planes), prot) in enumerate(zip(chunk, protected)):
                png = encode_png(prot, img.alpha, meta.get("label") if pkey.conditional else None)
                entry = {**meta, "sha256": sha256_bytes(png), "tile": tile}
                if refine_steps:
                    entry["refine_steps"] = refine_steps
                residual = None
                if lossless:
                    values = protector_values(
                        net, prot[None], None if y is None else y[k : k + 1],
                        inverse=True, tile=tile, device=dev,
                    )[0].numpy()  # fmt: skip
                    residual = encode_residual(planes, values, lossless_margin)
                    entry["sidecar"] = {
                        "file": out_rel + SIDECAR_SUFFIX,
                        "sha256": sha256_bytes(residual),
                        "bytes": len(residual),
                        "bits_per_pixel": 8.0 * len(residual) / (prot.shape[1] * prot.shape[2]),
                    }
                results.append((rel, out_rel, png, residual, entry))
        except (RuntimeError, MemoryError, ValueError) as e:
            for rel, *_ in chunk:
                run.fail(rel, f"protection failed ({type(e).__name__}: {e})")
            return
        sidecars = [r[4]["sidecar"]["file"] for r in results if r[3] is not None]
        folder.begin([r[1] for r in results], sidecars)
        for rel, out_rel, png, residual, entry in results:
            run.store(rel, out_rel, entry, png, residual)
        folder.sync()

    run.open()
    batcher = Batcher(batch_size, max_batch_pixels, protect)
    try:
        for index, rel in enumerate(images):
            out_rel = names.get(rel)
            if out_rel is None:
                run.fail(rel, name_failures[rel])
                continue
            try:
                data = read_source_bytes(src / rel)
            except OSError as e:
                run.fail(rel, read_error(e))
                continue
            source_sha = sha256_bytes(data)
            rec = folder.records.get(out_rel)
            if (
                rec is not None
                and rec.get("source") == rel
                and rec.get("source_sha256") == source_sha
                and rec.get("label") == label_of.get(rel)
                and rec.get("refine_steps", 0) == refine_steps
                and folder.intact(out_rel, rec, need_sidecar=lossless)
            ):
                run.skip(rel)
                continue
            why = folder.can_write(out_rel)
            if why is None and lossless:
                why = folder.can_write_sidecar(out_rel + SIDECAR_SUFFIX)
            if why is not None:
                run.fail(rel, why)
                continue
            try:
                img = decode_image(data)
                planes = key_planes(img, channels)  # refused now, before it joins a batch
            except ImageDecodeError as e:
                run.fail(rel, str(e))
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
                "mode": stored_mode(channels, img.alpha is not None),
                "conversions": img.conversions,
                "label": label_of.get(rel),
            }
            if pkey.conditional:
                meta["label_embedded"] = True
            del data
            batcher.add((rel, out_rel, img, meta, planes), h, w, tile, index)
        batcher.flush()
        # Only entries of current inputs that were not just refused: an older output of an
        # input that now fails (edited into a corrupt file, say) no longer belongs here.
        files = {
            rel: e
            for rel, e in sorted(folder.records.items())
            if names.get(e.get("source")) == rel and e["source"] not in run.summary.failed
        }
        sc_bytes, sc_bpp = sidecar_totals(files)
        manifest = new_manifest(
            "protected",
            files,
            classes=pkey.classes,
            source_fingerprint=source_files_fingerprint(files),
            protector_fingerprint=fingerprint,
            key_fingerprint=fingerprint,  # the format 1 name, kept for older readers
            protector_config=net.config,
            labels_from=labels_from,
            label_folder_level=0 if labels_from == LABELS_FROM_FOLDERS else None,
            lossless=bool(files) and all("sidecar" in e for e in files.values()),
            sidecar_bytes=sc_bytes,
            sidecar_bits_per_pixel=sc_bpp,
            failed=dict(sorted(run.summary.failed.items())),
        )
        index = None
        if sc_root is not None:
            index = {
                "format": FORMAT,
                "kind": "sidecar",
                "key_fingerprint": fingerprint,
                "tool_version": manifest["tool_version"],
                "files": {rel: e["sidecar"] for rel, e in files.items() if e.get("sidecar")},
            }
        run.finish(manifest, index)
    finally:
        summary = run.close()
    summary.sidecar_bytes, summary.sidecar_bits_per_pixel = sc_bytes, sc_bpp
    return summary
