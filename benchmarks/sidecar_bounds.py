"""How small a lossless sidecar can get for a key: its residual against coders and bounds.

For a key and a class-folder of images (the owner's layout), protects each image, stores it
in 8 bits, restores it with the key and takes the residual ``original - round(restore)``
that the sidecar codes. Prints, in bits per pixel:

- the sidecar's own formats (format 1: zlib/bz2; format 2: WebP lossless or LZMA per image,
  what ``raeg protect --lossless`` writes);
- other lossless image codecs on the same residual images, per image, when the optional
  ``imagecodecs`` package is installed (JPEG XL, JPEG-LS);
- the residual's order-0 entropy (what a coder without context can reach);
- a context-model estimate: a least-squares predictor from the already-coded neighbours
  (four causal ones in the same channel, and the earlier channels' pixel and its four
  neighbours) per 2x2 position, fitted on half of the images; the entropy of the residual
  given its quantised prediction and local activity, measured on the other half. An
  adaptive coder with that model could get near it; no coder without a better restore can
  get far below it.
- the log-determinant floor: ``-log2|det dG/dx|`` per pixel (the invertible protector's
  :meth:`~raeg_pl.models.protector.InvertibleProtector.forward_log_det`), the bits that
  rounding the protected image to 8 bits loses: about that many 8-bit originals store to
  the same protected file, so no sidecar coder can go below it (clipped pixels lose more).
  A coder that knew the inverse's whole Jacobian could approach it.

With ``--refine N`` the stored images come from restore-aware rounding
(:func:`raeg_pl.io.apply.restore_aware_rounding`, ``raeg protect --refine N``): the same
figures show what it changes in the residual. Also printed: the restore's PSNR, its exact
values, its mean error on the values the originals hold at 0 or 255 (where clipping
loses most) and elsewhere, the protected images' PSNR and the protecting time.

    .venv/bin/python benchmarks/sidecar_bounds.py --key K.raegkey --input FOLDER [--limit 1000] \
        [--refine N]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from raeg_pl.io.apply import apply_protector, protector_values
from raeg_pl.io.keyfile import read_key
from raeg_pl.io.reader import decode_image, list_class_folder, read_source_bytes
from raeg_pl.io.sidecar import encode_residual

NEIGHBOURS = [(0, -1), (-1, -1), (-1, 0), (-1, 1), (0, -2), (-2, 0)]
AROUND = [(0, 0), (0, -1), (-1, 0), (0, 1), (1, 0)]


def entropy_bits(symbols: np.ndarray, context: np.ndarray | None = None) -> float:
    """Total bits of ``symbols`` under their empirical (conditional) distribution."""
    symbols = symbols.astype(np.int64).ravel()
    if context is None:
        _, counts = np.unique(symbols, return_counts=True)
        p = counts / counts.sum()
        return float(-(counts * np.log2(p)).sum())
    context = context.astype(np.int64).ravel()
    joint = context * (1 << 20) + (symbols + (1 << 19))
    _, cj = np.unique(joint, return_counts=True)
    _, cc = np.unique(context, return_counts=True)
    return float(-(cj * np.log2(cj)).sum() + (cc * np.log2(cc)).sum())


def context_model_bits(res: np.ndarray) -> tuple[float, int]:
    """(bits of the second half of ``res`` (N, C, H, W) under the model fitted on the first
    half, pixels coded)."""
    n, c, h, w = res.shape
    r = res.astype(np.float64)
    pad = np.pad(r, ((0, 0), (0, 0), (2, 2), (2, 2)))

    def shifted(ch: int, dy: int, dx: int) -> np.ndarray:
        return pad[:, ch, 2 + dy : 2 + dy + h, 2 + dx : 2 + dx + w]

    rows, cols = np.meshgrid(np.arange(h) % 2, np.arange(w) % 2, indexing="ij")
    parity = np.broadcast_to(rows * 2 + cols, (n, h, w))
    fit, test = np.arange(n) < n // 2, np.arange(n) >= n // 2
    bits = 0.0
    for ch in range(c):
        feats = [shifted(ch, dy, dx) for dy, dx in NEIGHBOURS]
        feats += [shifted(p, dy, dx) for p in range(ch) for dy, dx in AROUND]
        x = np.stack([*feats, np.ones_like(r[:, ch])], -1)
        pred = np.zeros((n, h, w))
        for q in range(4):
            train = (parity == q) & fit[:, None, None]
            weights = np.linalg.lstsq(x[train], r[:, ch][train], rcond=None)[0]
            pred[parity == q] = x[parity == q] @ weights
        activity = np.minimum(np.abs(feats[0]) + np.abs(feats[2]), 6)
        context = (np.clip(np.round(pred * 3), -12, 12) + 12) * 7 + activity
        bits += entropy_bits(r[test, ch], context[test])
    return bits, int(test.sum()) * h * w


def other_codecs(images: list[np.ndarray]) -> dict[str, float]:
    """Bytes of each residual image (H, W, 3) uint8 under the optional imagecodecs coders."""
    try:
        import imagecodecs
    except ImportError:
        return {}
    coders = {
        "jpegxl (effort 9)": lambda a: imagecodecs.jpegxl_encode(a, lossless=True, effort=9),
        "jpegls": lambda a: imagecodecs.jpegls_encode(a, level=0),
    }
    return {name: float(sum(len(f(a)) for a in images)) for name, f in coders.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--key", required=True)
    ap.add_argument("--input", required=True, help="class folder: <input>/<class>/<image>")
    ap.add_argument("--limit", type=int, default=1000, help="images, spread over the classes")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--refine", type=int, default=0, help="restore-aware rounding steps")
    args = ap.parse_args()
    torch.set_num_threads(1)
    key = read_key(args.key)
    classes, samples = list_class_folder(args.input)
    per_class = max(1, args.limit // len(classes))
    picked = [s for k in range(len(classes)) for s in [t for t in samples if t[1] == k][:per_class]]
    residuals, bodies = [], {"format 1 (zlib/bz2)": 0, "format 2 (WebP lossless / LZMA)": 0}
    webp_images, originals, protected = [], [], []
    protect_s, lost_bits = 0.0, 0.0
    log_det = getattr(key.net, "forward_log_det", None)
    for rel, idx in picked:
        rgb = decode_image(read_source_bytes(Path(args.input) / rel)).rgb.transpose(2, 0, 1)
        label = [key.classes.index(classes[idx])] if key.classes else None
        t0 = time.perf_counter()
        stored = apply_protector(
            key.net, rgb[None], label, batch_size=None, refine_steps=args.refine
        )
        protect_s += time.perf_counter() - t0
        originals.append(rgb)
        if log_det is not None:
            with torch.no_grad():
                x = torch.as_tensor(rgb[None]).float() / 255
                y = torch.as_tensor(label) if label else None
                lost_bits -= float(log_det(x, y)[1][0]) / np.log(2)
        protected.append(stored[0].numpy())
        values = protector_values(key.net, stored, label, inverse=True)[0].numpy()
        bodies["format 1 (zlib/bz2)"] += len(encode_residual(rgb, values, codecs=(0, 1)))
        bodies["format 2 (WebP lossless / LZMA)"] += len(encode_residual(rgb, values))
        res = rgb.astype(np.int16) - np.round(values).astype(np.int16)
        residuals.append(res)
        webp_images.append(np.clip(res + 128, 0, 255).astype(np.uint8).transpose(1, 2, 0))
    res = np.stack(residuals)
    pixels = res.shape[0] * res.shape[2] * res.shape[3]
    bodies.update(other_codecs(webp_images))
    figures = {name: 8 * size / pixels for name, size in bodies.items()}
    figures["order-0 entropy"] = entropy_bits(res) / pixels
    bits, coded = context_model_bits(res)
    figures["context model (held-out half)"] = bits / coded
    if log_det is not None:
        figures["log-determinant floor"] = lost_bits / pixels
    figures["restore PSNR (dB)"] = float(10 * np.log10(255**2 / np.mean(res.astype(float) ** 2)))
    figures["exact values (%)"] = float(100 * np.mean(res == 0))
    orig = np.stack(originals)
    saturated = (orig == 0) | (orig == 255)
    err = np.abs(res.astype(float))
    figures["mean error, originals at 0 or 255 (levels)"] = float(err[saturated].mean())
    figures["mean error, other values (levels)"] = float(err[~saturated].mean())
    diff = np.stack(protected).astype(float) - orig
    figures["protected PSNR (dB)"] = float(10 * np.log10(255**2 / np.mean(diff**2)))
    figures["protect seconds per 1,000 images (1 thread)"] = 1000 * protect_s / len(picked)
    print(
        f"{len(picked)} images, {res.shape[2]}x{res.shape[3]}, refine {args.refine}; bits per pixel:"
    )
    for name, value in figures.items():
        print(f"  {name:34s} {value:8.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
