"""Atomic file writes and content hashes shared by every writer in the project.

Kept free of Lightning and torch so that the folder tools and key files stay light.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

# A run folder's files (the stage writes them, the grid plans with them, the tables read them).
RESULTS_FILE = "results.json"  # a stage's metrics, commit and config hash
RECIPE_FILE = "recipe.json"  # what a stage was computed from (its recipe hash)
PLAN_FILE = "grid.json"  # a grid's rows, pirates and defences


def sha256_bytes(data: bytes) -> str:
    """SHA-256 hex digest of bytes."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(
    path: str | os.PathLike,
    data: bytes,
    fsync: bool = False,
    prefix: str | None = None,
    suffix: str = ".tmp",
) -> None:
    """Writes bytes to a temporary file beside ``path``, then renames it into place.

    Args:
        path: destination; its folder is created.
        data: the file's content.
        fsync: flush the data to disk before the rename (journals, key files).
        prefix: temporary-name prefix (default ``.<name>.``); a fixed one lets a resumed
            job recognise and remove leftovers of a killed run.
        suffix: temporary-name suffix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix or f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic_text(path: str | os.PathLike, text: str) -> None:
    """``write_atomic`` for UTF-8 text."""
    write_atomic(path, text.encode())
