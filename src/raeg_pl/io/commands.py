"""``raeg export-key | protect | restore | verify``: the dataset owner's commands.

::

    raeg export-key --checkpoint runs/.../protector.ckpt --out owner.raegkey
    raeg protect --key owner.raegkey --input photos/ --output photos_protected/ [--lossless] \\
                 [--labels labels.csv] [--refine 20]
    raeg restore --key owner.raegkey --input photos_protected/ --output photos_restored/ \\
                 [--sidecar photos_protected.sidecar/ | --no-sidecar]
    raeg verify --input photos_protected/ [--sidecar photos_protected.sidecar/]

A label-conditioned key labels each image by its class folder (``photos/<class>/...``) or
by ``--labels`` (``relative_path,class`` lines) for a flat folder. ``raeg restore`` uses the
lossless sidecar at protect's default place (``OUTPUT.sidecar/``) when it is there.

Exit codes: 0 everything fine; 1 some files failed, or were missing, modified or extra;
2 usage errors and refusals (output inside input, wrong key, not a key file...), in which
case nothing was written.
"""

from __future__ import annotations

import argparse
import json
import sys

from raeg_pl.io.manifest import FolderError
from raeg_pl.io.owner import DEFAULT_TILE
from raeg_pl.io.summary import FolderSummary

EXIT_OK, EXIT_FILES, EXIT_REFUSED = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="raeg", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export-key", help="write a standalone key file from a protector checkpoint")
    p.add_argument("--checkpoint", required=True, help="ProtectorLitModule checkpoint or key file")
    p.add_argument("--out", required=True, help="key file to write")
    p.add_argument(
        "--classes",
        default=None,
        help="label-conditioned protector: comma-separated class names in label order, or a "
        "class-folder dataset root whose sorted subfolder names are the classes",
    )

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1...)")
        p.add_argument("--batch-size", type=int, default=16, help="images per network call")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--json", action="store_true", help="print the summary as JSON")

    p = sub.add_parser("protect", help="protect every image under a folder")
    p.add_argument("--key", required=True, help="key file (raeg export-key)")
    p.add_argument("--input", required=True, help="folder of source images (only read)")
    p.add_argument("--output", required=True, help="protected folder to write")
    p.add_argument(
        "--lossless",
        action="store_true",
        help="also write residuals for bit-exact restore (to OUTPUT.sidecar/ by default)",
    )
    p.add_argument("--sidecar", default=None, help="sidecar folder (implies --lossless)")
    p.add_argument(
        "--labels",
        default=None,
        help="label-conditioned key, flat folder: CSV of 'relative_path,class' lines "
        "(class name or index); default: the class folders INPUT/<class>/...",
    )
    p.add_argument(
        "--tile",
        type=int,
        default=DEFAULT_TILE,
        help=f"protect images larger than this in tiles (default {DEFAULT_TILE}; 0: never)",
    )
    p.add_argument(
        "--refine",
        type=int,
        default=0,
        metavar="STEPS",
        help="search STEPS steps per batch for stored images that restore closer to the "
        "originals (restore is unchanged; about STEPS times slower; default 0: plain rounding)",
    )
    common(p)

    p = sub.add_parser("restore", help="restore a protected folder")
    p.add_argument("--key", required=True, help="the key the folder was protected with")
    p.add_argument("--input", required=True, help="protected folder (with manifest.json)")
    p.add_argument("--output", required=True, help="recovered folder to write")
    p.add_argument(
        "--sidecar",
        default=None,
        help="lossless sidecar folder: bit-exact restore (default: INPUT.sidecar/ if present)",
    )
    p.add_argument(
        "--no-sidecar", action="store_true", help="restore approximately even if a sidecar exists"
    )
    common(p)

    p = sub.add_parser("verify", help="check a protected or restored folder against its manifest")
    p.add_argument("--input", required=True, help="folder with manifest.json")
    p.add_argument("--sidecar", default=None, help="also check a lossless sidecar folder")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return ap


def _print(summary: FolderSummary, as_json: bool) -> int:
    if as_json:
        print(json.dumps(summary.to_dict(), indent=1, sort_keys=True))
    else:
        print(summary.report())
    return EXIT_OK if summary.ok else EXIT_FILES


def _classes_arg(value: str | None) -> list[str] | None:
    """``--classes``: a class-folder root (its sorted subfolders) or comma-separated names."""
    if value is None:
        return None
    from pathlib import Path

    root = Path(value)
    if root.is_dir():
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [c.strip() for c in value.split(",")]


def main(argv: list[str] | None = None) -> int:
    """Runs one command; ``argv`` starts with the command name. Returns the exit code."""
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # argparse exits on -h and on usage errors
        return EXIT_OK if e.code in (0, None) else EXIT_REFUSED
    from raeg_pl.io.keyfile import KeyFileError

    try:
        if args.command == "export-key":
            from raeg_pl.io.keyfile import export_key

            fingerprint = export_key(args.checkpoint, args.out, _classes_arg(args.classes))
            print(f"wrote key {args.out} (fingerprint {fingerprint})")
            return EXIT_OK
        if args.command in ("protect", "restore") and args.batch_size < 1:
            raise FolderError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.command == "protect" and args.refine < 0:
            raise FolderError(f"--refine must be >= 0, got {args.refine}")
        if args.command == "protect":
            from raeg_pl.io.protect import protect_folder

            summary = protect_folder(
                args.key,
                args.input,
                args.output,
                batch_size=args.batch_size,
                device=args.device,
                lossless=args.lossless,
                sidecar_dir=args.sidecar,
                progress=not args.no_progress,
                tile=args.tile,
                labels=args.labels,
                refine_steps=args.refine,
            )
        elif args.command == "restore":
            from raeg_pl.io.restore import restore_folder

            summary = restore_folder(
                args.key,
                args.input,
                args.output,
                sidecar_dir=args.sidecar,
                batch_size=args.batch_size,
                device=args.device,
                progress=not args.no_progress,
                find_sidecar=not args.no_sidecar,
            )
        else:
            from raeg_pl.io.verify import verify_store

            summary = verify_store(args.input, args.sidecar)
    except (FolderError, KeyFileError) as e:
        print(f"raeg {args.command}: error: {e}", file=sys.stderr)
        return EXIT_REFUSED
    return _print(summary, args.json)


if __name__ == "__main__":
    sys.exit(main())
