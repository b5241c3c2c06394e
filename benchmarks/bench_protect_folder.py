"""Folder protect / restore throughput, peak memory against folder size, sidecar size.

Two modes. With ``--input DIR`` (a class-folder copy of real images, e.g. 300 CIFAR-10
test JPEGs under ``DIR/<class>/``) and ``--key K`` (any key, label-conditioned or not) it
evaluates that key on that folder (see :func:`evaluate_folder`): plain restore PSNR and
exact pixel rate, lossless sidecar bits per pixel (against the format-1 codec on the same
residuals and the source files' own bits per pixel), bit-exactness of the lossless
restore, and protect / restore throughput as ratios to a baseline measured in the same
run (decode + PNG encode of the same folder, no network)::

    .venv/bin/python benchmarks/bench_protect_folder.py --key owner.raegkey --input /tmp/cifar300

Without ``--input`` it runs the synthetic suite below.

Every measurement runs the owner commands in a fresh subprocess, so each peak RSS
(``VmHWM`` from ``/proc/self/status``) belongs to one operation on one folder:

* ``throughput``: protect and restore img/s on real CIFAR-10 test JPEGs (32x32) and on
  512x512 photos (4x4 mosaics of CIFAR-10 photos, upscaled), plus lossless protect and
  restore on the 32x32 set and on large photos;
* ``memory``: peak RSS of protect and restore on 100 vs 1,000 images of 512x512; the
  peak must not grow with the number of files (images are decoded one at a time and run
  in small batches);
* ``sidecar``: lossless residual size in bits per pixel on CIFAR-10 test images and on large
  photos (1536x1024 mosaics, protected in 1024 tiles), with the plain restore PSNR that
  the residual makes up for, and a check that the lossless restore is bit-exact.

Without ``--key`` a synthetic key is used: ``InvertibleProtector(3, 2, 2, 32)`` (the quick
experiment's architecture) with Gaussian weight noise, far from the identity like a trained
one; sidecar sizes depend on the key, so pass ``--key`` for a trained protector's figures.
The photos come from ``$RAEG_DATA_DIR/cifar10/test`` (synthetic smooth noise when absent,
recorded as ``"data": "synthetic"``).

    .venv/bin/python benchmarks/bench_protect_folder.py [--key K] [--threads 1] [--quick]

``--quick`` runs the same cases on tiny folders (seconds) to check the script itself.
Writes ``runs/benchmarks/protect_folder.json`` (``protect_folder_quick.json`` with ``--quick``,
``protect_folder_eval.json`` with ``--input``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from raeg_pl.data.datamodule import CIFAR10_CLASSES

CLASSES = CIFAR10_CLASSES
FULL = {
    "cifar_images": 500,
    "photo_size": 512,
    "photo_counts": [100, 1000],
    "large_size": [1536, 1024],
    "large_images": 8,
    "tile": 1024,
}
QUICK = {
    "cifar_images": 40,
    "photo_size": 96,
    "photo_counts": [10, 30],
    "large_size": [320, 256],
    "large_images": 2,
    "tile": 128,
}


# --------------------------------------------------------------------------- child side
def _status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in MiB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _copy_folder(src: str, out: str):
    """The baseline: decode every image and write it as PNG, without any network."""
    from raeg_pl.io.reader import decode_image, list_images
    from raeg_pl.io.summary import FolderSummary
    from raeg_pl.io.writer import encode_png

    images, _ = list_images(src)
    summary = FolderSummary("copy", src, out, total=len(images))
    for rel in images:
        img = decode_image((Path(src) / rel).read_bytes())
        target = Path(out) / Path(rel).with_suffix(".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(encode_png(img.rgb.transpose(2, 0, 1), img.alpha))
        summary.written.append(rel)
    return summary


def child(spec: dict) -> None:
    """Runs one protect, restore or copy and prints one JSON line with time and memory."""
    import torch

    from raeg_pl.io.keyfile import read_key
    from raeg_pl.io.protect import protect_folder
    from raeg_pl.io.restore import restore_folder

    torch.set_num_threads(spec["threads"])
    net = read_key(spec["key"])
    baseline = _status_mb("VmRSS")
    t0 = time.perf_counter()
    common = {"batch_size": spec["batch_size"], "device": spec["device"], "progress": False}
    if spec["op"] == "copy":
        summary = _copy_folder(spec["input"], spec["output"])
    elif spec["op"] == "protect":
        summary = protect_folder(
            net,
            spec["input"],
            spec["output"],
            lossless=spec["lossless"],
            tile=spec["tile"],
            **common,
        )
    else:
        summary = restore_folder(
            net,
            spec["input"],
            spec["output"],
            sidecar_dir=spec.get("sidecar"),
            find_sidecar=spec.get("find_sidecar", True),
            **common,
        )
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "ok": summary.ok,
                "images": len(summary.written),
                "seconds": seconds,
                "img_per_s": len(summary.written) / seconds,
                "baseline_rss_mb": baseline,
                "peak_rss_mb": _status_mb("VmHWM"),
                "sidecar_bits_per_pixel": summary.sidecar_bits_per_pixel,
                "exact": summary.exact,
                "failed": dict(list(summary.failed.items())[:5]),
            }
        )
    )


# -------------------------------------------------------------------------- parent side
def _run(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({spec['op']}): {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["ok"]:
        raise RuntimeError(f"{spec['op']} on {spec['input']} not ok: {result['failed']}")
    return result


def _cifar_files(data_root: Path | None, n: int) -> list[Path]:
    if data_root is None:
        return []
    per = -(-n // len(CLASSES))
    files: list[Path] = []
    for cls in CLASSES:
        files += sorted((data_root / "cifar10" / "test" / cls).iterdir())[:per]
    return files[:n]


class PhotoMaker:
    """Real photos: mosaics of CIFAR-10 test images, upscaled (synthetic without data)."""

    def __init__(self, sources: list[Path], seed: int = 0) -> None:
        self.sources, self.rng, self.k = sources, np.random.default_rng(seed), 0

    def make(self, size: tuple[int, int], cols: int, rows: int) -> Image.Image:
        if not self.sources:
            small = self.rng.integers(0, 256, (rows * 4, cols * 4, 3), dtype=np.uint8)
            return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        canvas = Image.new("RGB", (cols * 32, rows * 32))
        for r in range(rows):
            for c in range(cols):
                with Image.open(self.sources[self.k % len(self.sources)]) as im:
                    canvas.paste(im.convert("RGB"), (c * 32, r * 32))
                self.k += 1
        return canvas.resize(size, Image.Resampling.BICUBIC)


def _photo_folder(maker: PhotoMaker, root: Path, n: int, size: tuple[int, int], grid) -> Path:
    for i in range(n):
        path = root / f"{i % 10}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        maker.make(size, *grid).save(path, quality=92)
    return root


def _psnr_folders(a: Path, b: Path) -> float:
    """Mean-squared-error PSNR over all RGB pixels of two folders of same-named PNGs."""
    se, count = 0.0, 0
    for path in sorted(a.rglob("*.png")):
        with Image.open(path) as x, Image.open(b / path.relative_to(a)) as y:
            d = np.asarray(x)[..., :3].astype(np.float64) - np.asarray(y)[..., :3]
        se += float(np.square(d).sum())
        count += d.size
    mse = se / max(count, 1)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def _synthetic_key(path: Path) -> None:
    import torch

    from raeg_pl.io.keyfile import save_key
    from raeg_pl.models.protector import InvertibleProtector

    net = InvertibleProtector(3, 2, 2, 32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.002)
    save_key(net, path)


def _pixel_stats(a: Path, b: Path) -> dict:
    """PSNR (dB) and exact pixel rate of folder ``a`` against folder ``b`` (same PNG names)."""
    se, count, equal = 0.0, 0, 0
    for path in sorted(a.rglob("*.png")):
        with Image.open(path) as x, Image.open(b / path.relative_to(a)) as y:
            d = np.asarray(x)[..., :3].astype(np.float64) - np.asarray(y)[..., :3]
        se += float(np.square(d).sum())
        count += d.size
        equal += int((d == 0).sum())
    mse = se / max(count, 1)
    psnr = float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
    return {"psnr_db": psnr, "exact_pixel_rate": equal / max(count, 1), "values": count}


def _format1_bits_per_pixel(key_path: Path, protected: Path, source: Path) -> dict:
    """Sidecar bits per pixel of the format-1 codec (zlib/bz2) on the same residuals."""
    import torch

    from raeg_pl.io.apply import protector_values
    from raeg_pl.io.keyfile import read_key
    from raeg_pl.io.reader import decode_image
    from raeg_pl.io.sidecar import encode_residual, residual_codec

    key = read_key(key_path)
    manifest = json.loads((protected / "manifest.json").read_text())
    nbytes = pixels = 0
    codecs: dict[str, int] = {}
    for rel, entry in manifest["files"].items():
        with Image.open(protected / rel) as im:
            prot = torch.from_numpy(np.asarray(im)[..., :3].copy()).permute(2, 0, 1)[None]
        label = [key.classes.index(entry["label"])] if key.conditional else None
        values = protector_values(key.net, prot, label, inverse=True, tile=entry["tile"])[0]
        original = decode_image((source / entry["source"]).read_bytes()).rgb.transpose(2, 0, 1)
        nbytes += len(encode_residual(original, values.numpy(), codecs=(0, 1)))
        pixels += entry["width"] * entry["height"]
        sidecar = protected.with_name(protected.name + ".sidecar") / entry["sidecar"]["file"]
        name = residual_codec(sidecar.read_bytes())
        codecs[name] = codecs.get(name, 0) + 1
    return {"format1_bits_per_pixel": 8.0 * nbytes / max(pixels, 1), "codecs_chosen": codecs}


def evaluate_folder(args: argparse.Namespace, scratch: Path) -> dict:
    """One key on one class-folder copy: restore quality, sidecar size, throughput ratios."""
    from raeg_pl.io.keyfile import read_key

    key_path, src = Path(args.key), Path(args.input)
    key = read_key(key_path)
    base = {
        "key": str(key_path),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "device": args.device,
        "tile": 1024,
        "lossless": False,
    }

    def run(op: str, inp: Path, out: Path, **kw) -> dict:
        r = _run({**base, "op": op, "input": str(inp), "output": str(out), **kw})
        print(
            f"  {op:8s} {out.name:12s} {r['images']:5d} img  {r['img_per_s']:8.1f} img/s",
            flush=True,
        )
        return r

    copy = run("copy", src, scratch / "copy")
    prot = run("protect", src, scratch / "prot")
    prot_l = run("protect", src, scratch / "protl", lossless=True)
    rest_l = run("restore", scratch / "protl", scratch / "rec_lossless")
    rest = run("restore", scratch / "protl", scratch / "rec_plain", find_sidecar=False)
    exact = _pixel_stats(scratch / "rec_lossless", scratch / "copy")
    plain = _pixel_stats(scratch / "rec_plain", scratch / "copy")
    protected = _pixel_stats(scratch / "prot", scratch / "copy")
    old = _format1_bits_per_pixel(key_path, scratch / "protl", src)
    sources = [p for p in src.rglob("*") if p.is_file()]
    src_pixels = 0
    for path in sources:
        with Image.open(path) as im:
            src_pixels += im.width * im.height
    src_bpp = 8.0 * sum(p.stat().st_size for p in sources) / max(src_pixels, 1)
    bpp = prot_l["sidecar_bits_per_pixel"]
    return {
        "input": str(src),
        "images": prot["images"],
        "key": {
            "path": str(key_path),
            "fingerprint": key.fingerprint,
            "config": key.net.config,
            "conditional": key.conditional,
            "classes": list(key.classes),
        },
        "protected_psnr_db": protected["psnr_db"],
        "restore_plain_psnr_db": plain["psnr_db"],
        "restore_plain_exact_pixel_rate": plain["exact_pixel_rate"],
        "restore_lossless_exact_pixel_rate": exact["exact_pixel_rate"],
        "restore_lossless_exact_images": rest_l["exact"],
        "sidecar_bits_per_pixel": bpp,
        "sidecar_format1_bits_per_pixel": old["format1_bits_per_pixel"],
        "sidecar_codecs_chosen": old["codecs_chosen"],
        "sidecar_vs_format1": bpp / old["format1_bits_per_pixel"],
        "source_bits_per_pixel": src_bpp,
        "sidecar_vs_source": bpp / src_bpp,
        "img_per_s": {
            "baseline_decode_png": copy["img_per_s"],
            "protect": prot["img_per_s"],
            "protect_lossless": prot_l["img_per_s"],
            "restore_lossless": rest_l["img_per_s"],
            "restore_plain": rest["img_per_s"],
        },
        "throughput_vs_baseline": {
            "protect": prot["img_per_s"] / copy["img_per_s"],
            "protect_lossless": prot_l["img_per_s"] / copy["img_per_s"],
            "restore_lossless": rest_l["img_per_s"] / copy["img_per_s"],
            "restore_plain": rest["img_per_s"] / copy["img_per_s"],
        },
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "device": args.device,
            "batch_size": args.batch_size,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--key", default=None, help="key file (default: synthetic key)")
    ap.add_argument(
        "--input",
        default=None,
        help="class-folder copy of real images: evaluate --key on it (restore PSNR, exact "
        "pixel rate, sidecar bits per pixel, throughput ratios) instead of the suite",
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny folders: checks the script")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument(
        "--out",
        default=None,
        help="result file (default runs/benchmarks/protect_folder.json; "
        "protect_folder_quick.json with --quick, so a check never replaces real figures)",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.input:
        if not args.key:
            ap.error("--input needs --key")
        scratch = Path(args.workdir or tempfile.mkdtemp(prefix="bench_protect_folder_"))
        try:
            result = evaluate_folder(args, scratch)
        finally:
            if not args.workdir:
                shutil.rmtree(scratch, ignore_errors=True)
        out = Path(args.out or Path("runs/benchmarks") / "protect_folder_eval.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    cfg = QUICK if args.quick else FULL
    data_dir = os.environ.get("RAEG_DATA_DIR") or "data"
    data_root = Path(data_dir) if (Path(data_dir) / "cifar10" / "test").is_dir() else None
    scratch = Path(args.workdir or tempfile.mkdtemp(prefix="bench_protect_folder_"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        key = Path(args.key) if args.key else scratch / "synthetic.raegkey"
        if not args.key:
            _synthetic_key(key)
        from raeg_pl.io.keyfile import read_key

        net = read_key(key).net
        base = {
            "key": str(key),
            "threads": args.threads,
            "batch_size": args.batch_size,
            "device": args.device,
            "tile": cfg["tile"],
            "lossless": False,
        }

        def run(op: str, inp: Path, out: Path, **kw) -> dict:
            r = _run({**base, "op": op, "input": str(inp), "output": str(out), **kw})
            print(
                f"  {op:8s} {inp.name:14s} {r['images']:5d} img  {r['img_per_s']:8.1f} img/s  "
                f"peak {r['peak_rss_mb']:.0f} MiB",
                flush=True,
            )
            return r

        sources = _cifar_files(data_root, max(cfg["cifar_images"], 160))
        maker = PhotoMaker(sources)
        result: dict = {
            "quick": args.quick,
            "data": "cifar10" if data_root else "synthetic",
            "machine": {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "threads": args.threads,
                "device": args.device,
                "batch_size": args.batch_size,
            },
            "key": {
                "synthetic": not args.key,
                "config": net.config,
                "fingerprint": net.fingerprint(),
            },
            "config": cfg,
        }

        # 32x32: real CIFAR-10 test JPEGs; plain and lossless.
        cifar = scratch / "cifar"
        if sources:
            for f in sources[: cfg["cifar_images"]]:
                dst = cifar / f.parent.name / f.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, dst)
        else:
            _photo_folder(maker, cifar, cfg["cifar_images"], (32, 32), (1, 1))
        print("32x32 (CIFAR-10 test):", flush=True)
        p32 = run("protect", cifar, scratch / "cifar_p")
        r32 = run("restore", scratch / "cifar_p", scratch / "cifar_r")
        pl32 = run("protect", cifar, scratch / "cifar_pl", lossless=True)
        rl32 = run(
            "restore",
            scratch / "cifar_pl",
            scratch / "cifar_rl",
            sidecar=str(scratch / "cifar_pl.sidecar"),
        )
        plain32 = run("restore", scratch / "cifar_pl", scratch / "cifar_rp", find_sidecar=False)

        # 512x512 photos: throughput and peak memory against the number of files.
        s = cfg["photo_size"]
        memory = []
        counts = cfg["photo_counts"]
        big = _photo_folder(maker, scratch / f"photo{counts[-1]}", counts[-1], (s, s), (4, 4))
        print(f"{s}x{s} photos:", flush=True)
        for n in counts:
            folder = scratch / f"photo{n}"
            if n != counts[-1]:  # the first n files of the big folder
                for path in sorted(big.rglob("*.jpg"))[:n]:
                    dst = folder / path.relative_to(big)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, dst)
            p = run("protect", folder, scratch / f"photo{n}_p")
            r = run("restore", scratch / f"photo{n}_p", scratch / f"photo{n}_r")
            memory.append(
                {
                    "images": n,
                    "size": s,
                    "baseline_rss_mb": p["baseline_rss_mb"],
                    "protect_peak_rss_mb": p["peak_rss_mb"],
                    "restore_peak_rss_mb": r["peak_rss_mb"],
                    "protect_img_per_s": p["img_per_s"],
                    "restore_img_per_s": r["img_per_s"],
                }
            )
            shutil.rmtree(scratch / f"photo{n}_p")
            shutil.rmtree(scratch / f"photo{n}_r")

        # Large photos: lossless sidecar size, tiled protection.
        lw, lh = cfg["large_size"]
        large = _photo_folder(maker, scratch / "large", cfg["large_images"], (lw, lh), (6, 4))
        print(f"{lw}x{lh} photos (tile {cfg['tile']}):", flush=True)
        pll = run("protect", large, scratch / "large_pl", lossless=True)
        rll = run(
            "restore",
            scratch / "large_pl",
            scratch / "large_rl",
            sidecar=str(scratch / "large_pl.sidecar"),
        )
        rpl = run("restore", scratch / "large_pl", scratch / "large_rp", find_sidecar=False)

        def source_bpp(folder: Path) -> float:
            pixels = nbytes = 0
            for path in folder.rglob("*.jpg"):
                with Image.open(path) as im:
                    pixels += im.width * im.height
                nbytes += path.stat().st_size
            return 8.0 * nbytes / max(pixels, 1)

        result["throughput"] = [
            {
                "size": "32x32",
                "images": p32["images"],
                "protect_img_per_s": p32["img_per_s"],
                "restore_img_per_s": r32["img_per_s"],
                "protect_lossless_img_per_s": pl32["img_per_s"],
                "restore_lossless_img_per_s": rl32["img_per_s"],
            },
            {
                "size": f"{s}x{s}",
                "images": memory[0]["images"],
                "protect_img_per_s": memory[0]["protect_img_per_s"],
                "restore_img_per_s": memory[0]["restore_img_per_s"],
            },
            {
                "size": f"{lw}x{lh}",
                "images": pll["images"],
                "protect_lossless_img_per_s": pll["img_per_s"],
                "restore_lossless_img_per_s": rll["img_per_s"],
                "restore_img_per_s": rpl["img_per_s"],
            },
        ]
        result["memory"] = memory
        result["memory_growth_mb"] = {
            "protect": memory[-1]["protect_peak_rss_mb"] - memory[0]["protect_peak_rss_mb"],
            "restore": memory[-1]["restore_peak_rss_mb"] - memory[0]["restore_peak_rss_mb"],
        }
        result["sidecar"] = {
            "cifar10_test": {
                "images": pl32["images"],
                "size": "32x32",
                "bits_per_pixel": pl32["sidecar_bits_per_pixel"],
                "source_jpeg_bits_per_pixel": source_bpp(cifar),
                "plain_restore_psnr_db": _psnr_folders(scratch / "cifar_rp", scratch / "cifar_rl"),
                "lossless_exact": rl32["exact"],
                "plain_exact": plain32["exact"],
            },
            "large_photos": {
                "images": pll["images"],
                "size": f"{lw}x{lh}",
                "bits_per_pixel": pll["sidecar_bits_per_pixel"],
                "source_jpeg_bits_per_pixel": source_bpp(large),
                "plain_restore_psnr_db": _psnr_folders(scratch / "large_rp", scratch / "large_rl"),
                "lossless_exact": rll["exact"],
                "plain_exact": rpl["exact"],
            },
        }
    finally:
        if not args.workdir:
            shutil.rmtree(scratch, ignore_errors=True)
    default = "protect_folder_quick.json" if args.quick else "protect_folder.json"
    out = Path(args.out or Path("runs/benchmarks") / default)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
