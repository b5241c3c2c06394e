"""Run-directory records: results.json with metrics, git commit and config hash."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

import raeg_pl
from raeg_pl.utils.files import RESULTS_FILE, write_atomic_text


def git_commit(cwd: str | os.PathLike | None = None) -> dict[str, Any]:
    """The current git commit and whether the work tree has changes (None outside git)."""
    cwd = cwd or Path(raeg_pl.__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        return {"commit": sha, "dirty": bool(dirty.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def config_hash(config_text: str) -> str:
    """SHA-256 of a resolved config's text (first 16 hex digits)."""
    return hashlib.sha256(config_text.encode()).hexdigest()[:16]


def environment_info() -> dict[str, Any]:
    """Versions and hardware that a reader needs to interpret the numbers."""
    import lightning as L

    return {
        "raeg_pl": raeg_pl.__version__,
        "torch": torch.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
    }


def write_results(
    run_dir: str | os.PathLike, results: dict[str, Any], config_text: str = ""
) -> Path:
    """Writes ``<run_dir>/results.json`` with provenance added.

    Args:
        run_dir: the run directory.
        results: metrics and any other JSON-serialisable fields.
        config_text: the resolved config; its hash identifies the recipe.
    """
    record = {
        **results,
        "git": git_commit(),
        "config_hash": config_hash(config_text) if config_text else None,
        "environment": environment_info(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = Path(run_dir) / RESULTS_FILE
    if process_rank() == 0:  # under DDP every rank computes the same record; one writes it
        write_atomic_text(path, json.dumps(record, indent=2, sort_keys=True, default=float) + "\n")
    return path


def process_rank() -> int:
    """This process's global rank (0 without a process group or a launcher)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def to_float_dict(metrics: dict[str, Any]) -> dict[str, float]:
    """Tensor-valued metrics as plain floats."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1 or isinstance(v, (int, float)):
            out[k] = float(v)
    return out
