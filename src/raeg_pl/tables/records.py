"""Reading one result file: a grid's ``grid.json`` plan, a method's or a pirate run's
``results.json``, each validated (every malformed file raises :class:`TableError` naming the
file and the field).

Layout of a grid run directory::

    DIR/grid.json                                              the grid's plan
    DIR/methods/<row>/results.json                             one protection method
    DIR/pirates/<row>/<arch>/<defense>/seed<k>/results.json    one pirate training run
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLEAN = "clean"
NO_DEFENSE = "none"
SOURCES = ("protected", "recovered", "clean")
#: The provenance of a result file that records no git commit.
UNKNOWN_COMMIT = "unknown"


class TableError(ValueError):
    """Raised when the run directories cannot be turned into tables (named file or folder)."""


@dataclass
class GridPlan:
    """One ``grid.json``: the rows, architectures, defences and seeds a grid runs.

    Attributes:
        path: the ``grid.json`` file, or the run directory when it has none (then the lists
            are what its results contain).
        table: the grid's table name (``main``, ``robustness``, ``ablation``, ...).
        profile: ``quick`` or ``paper`` (None when unknown).
        rows: training-data rows in table order; ``clean`` is the clean-data baseline.
        methods: each method row's spec (``{"kind": "pgd", "eps": 6}``).
        archs: pirate architectures.
        defenses: pirate defences (``none``, ``gray``, ``jpeg:q=10``, ...).
        seeds: pirate seeds.
        eval_defenses: defences applied to protected test images at inference.
        heldout: clean-trained architectures evaluated on protected test images.
        authorized_archs: architectures of the authorised runs (None: all).
        pirate_rows: rows whose pirates are trained (None: all).
        parts: one plan per table when the grid folder is shared by several tables
            (``grid.json``'s ``tables`` entry); the merged lists above are their union, and
            only the parts' own products of rows, architectures, defences and seeds are
            planned cells.
    """

    path: Path
    table: str | None = None
    profile: str | None = None
    rows: list[str] = field(default_factory=list)
    methods: dict[str, Any] = field(default_factory=dict)
    archs: list[str] = field(default_factory=list)
    defenses: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    eval_defenses: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)
    authorized_archs: list[str] | None = None
    pirate_rows: list[str] | None = None
    parts: list[GridPlan] = field(default_factory=list)


@dataclass(frozen=True)
class PirateRun:
    """One pirate (or authorised, or clean-baseline) training run's clean-test accuracy.

    Attributes:
        row: the training-data row (the method's row for authorised runs; ``clean``).
        source: ``protected``, ``recovered`` (authorised) or ``clean``.
        arch: the classifier architecture.
        defense: the pirate's defence applied to its training images.
        seed: the training seed.
        test_acc: final clean-test accuracy, fraction in [0, 1].
        test_acc_peak: best clean-test accuracy over epochs, fraction (None if not recorded).
        path: the ``results.json`` it came from.
        commit: the git commit the run was made at, first 12 hex digits, ``+dirty`` when
            the work tree had uncommitted changes (None if not recorded).
    """

    row: str
    source: str
    arch: str
    defense: str
    seed: int
    test_acc: float
    test_acc_peak: float | None
    path: Path
    commit: str | None = None


CellKey = tuple[str, str, str, str]  # (row, source, arch, defense)


def source_of(row: str) -> str:
    """The training-data source of a row's pirates (the clean row trains on clean data)."""
    return CLEAN if row == CLEAN else "protected"


def unique(items: Iterable[Any]) -> list[Any]:
    """The distinct ``items`` in first-seen order (works for unhashable items too)."""
    out: list[Any] = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TableError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(data, dict):
        raise TableError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _number(data: dict, key: str, path: Path, fraction: bool = False) -> float | None:
    """``data[key]`` as a float; None when absent or null; TableError naming ``path`` if bad."""
    v = data.get(key)
    if v is None:
        return None
    if not _is_number(v):
        raise TableError(f"{path}: field {key!r} must be a number or null, got {v!r}")
    v = float(v)
    # Accuracies are fractions; a value like 41.0 means a writer stored percent.
    if fraction and not math.isnan(v) and not 0.0 <= v <= 1.0:
        raise TableError(f"{path}: field {key!r} = {v} is not a fraction in [0, 1]")
    return v


def _fraction_map(data: dict, key: str, path: Path) -> dict[str, float | None]:
    v = data.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise TableError(f"{path}: field {key!r} must be an object, got {type(v).__name__}")
    return {str(k): _number(v, k, path, fraction=True) for k in v}


def _str_list(data: dict, key: str, path: Path) -> list[str]:
    v = data.get(key)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise TableError(f"{path}: field {key!r} must be a list of strings, got {v!r}")
    return list(v)


def load_grid(path: Path) -> GridPlan:
    """A ``grid.json`` as a :class:`GridPlan`, with one part per table it plans."""
    data = _read_json(path)
    per_table = data.get("tables") or {}
    if not isinstance(per_table, dict) or not all(isinstance(t, dict) for t in per_table.values()):
        raise TableError(f"{path}: field 'tables' must map table names to grid plans")
    plan = _plan_from(data, path)
    plan.parts = [_plan_from(t, path) for t in per_table.values()]
    return plan


def _plan_from(data: dict, path: Path) -> GridPlan:
    seeds = data.get("seeds") or []
    if not isinstance(seeds, list) or not all(_is_number(s) and int(s) == s for s in seeds):
        raise TableError(f"{path}: field 'seeds' must be a list of integers, got {seeds!r}")
    methods = data.get("methods") or {}
    if not isinstance(methods, dict):
        raise TableError(f"{path}: field 'methods' must be an object")
    return GridPlan(
        path=path,
        table=data.get("table"),
        profile=data.get("profile"),
        rows=_str_list(data, "rows", path),
        methods=methods,
        archs=_str_list(data, "archs", path),
        defenses=_str_list(data, "defenses", path),
        seeds=[int(s) for s in seeds],
        eval_defenses=_str_list(data, "eval_defenses", path),
        heldout=_str_list(data, "heldout", path),
        authorized_archs=_str_list(data, "authorized_archs", path)
        if data.get("authorized_archs") is not None
        else None,
        pirate_rows=_str_list(data, "pirate_rows", path)
        if data.get("pirate_rows") is not None
        else None,
    )


def _commit(data: dict) -> str | None:
    """``<12 hex digits>[+dirty]`` of the record's git entry; None when it has none."""
    git = data.get("git")
    if isinstance(git, dict) and git.get("commit"):
        return str(git["commit"])[:12] + ("+dirty" if git.get("dirty") else "")
    if isinstance(data.get("git_commit"), str):
        return data["git_commit"][:12]
    return None


def load_method(path: Path) -> dict[str, Any]:
    """A method's ``results.json``, validated: fractions, dB values, per-defence maps."""
    data = _read_json(path)
    grid = data.get("grid") if isinstance(data.get("grid"), dict) else {}
    rev = data.get("reversible")
    if rev is not None and not isinstance(rev, bool):
        raise TableError(f"{path}: field 'reversible' must be true or false, got {rev!r}")
    out: dict[str, Any] = {
        "row": str(grid.get("row") or path.parent.name),
        "reversible": rev,
        "path": path,
        "commit": _commit(data),
        "kind": str(grid["method"]) if grid.get("method") is not None else None,
    }
    for key in ("psnr_protected", "ssim_protected", "linf_protected", "l2_protected"):
        out[key] = _number(data, key, path)
    for key in (
        "psnr_recovered",
        "ssim_recovered",
        "craft_seconds_per_1000",
        "protector_fit_seconds",
        "perturbation_classmean_share",
        "perturbation_cos_same_class",
        "perturbation_cos_diff_class",
    ):
        out[key] = _number(data, key, path)
    for key in ("exact_pixel_rate_recovered", "surrogate_acc_clean"):
        out[key] = _number(data, key, path, fraction=True)
    out["surrogate_acc_protected_by_defense"] = _fraction_map(
        data, "surrogate_acc_protected_by_defense", path
    )
    out["heldout_acc_clean"] = _fraction_map(data, "heldout_acc_clean", path)
    by_arch = data.get("heldout_acc_protected_by_defense") or {}
    if not isinstance(by_arch, dict):
        raise TableError(f"{path}: field 'heldout_acc_protected_by_defense' must be an object")
    out["heldout_acc_protected_by_defense"] = {
        str(arch): _fraction_map(by_arch, arch, path) for arch in by_arch
    }
    return out


def defense_key(name: str) -> str:
    """A defence spec or folder slug reduced to letters and digits (``jpeg:q=7.5`` -> ``jpegq7p5``)."""
    return re.sub(r"[^a-z0-9]", "", name.lower().replace(".", "p"))


def load_pirate(path: Path, pirates_dir: Path, known_defenses: list[str]) -> PirateRun | None:
    """A pirate run's ``results.json``; None for a file that is not one (no ``grid`` record
    and not at ``pirates/<row>/<arch>/<defense>/seed<k>/results.json``)."""
    data = _read_json(path)
    grid = data.get("grid")
    parts = path.relative_to(pirates_dir).parts
    if isinstance(grid, dict):
        if grid.get("kind") not in (None, "pirate"):
            return None
        try:
            row, arch, defense = str(grid["row"]), str(grid["arch"]), str(grid["defense"])
            seed = grid["seed"]
        except KeyError as e:
            raise TableError(f"{path}: 'grid' record lacks {e.args[0]!r}") from e
        source = str(grid.get("source") or (CLEAN if row == CLEAN else "protected"))
    elif len(parts) == 5 and re.fullmatch(r"seed-?\d+", parts[3]):
        row, arch, slug = parts[0], parts[1], parts[2]
        seed = int(parts[3].removeprefix("seed").removeprefix("-"))
        if defense_key(slug) in ("authorized", "authorised"):
            source, defense = "recovered", NO_DEFENSE
        else:
            source = CLEAN if row == CLEAN else "protected"
            # Folder names hold a slug of the defence; map it back to the grid's spelling.
            defense = next((d for d in known_defenses if defense_key(d) == defense_key(slug)), slug)
    else:
        return None
    if source not in SOURCES:
        raise TableError(f"{path}: 'grid.source' must be one of {SOURCES}, got {source!r}")
    if not _is_number(seed) or int(seed) != seed:
        raise TableError(f"{path}: 'grid.seed' must be an integer, got {seed!r}")
    acc = _number(data, "test_acc", path, fraction=True)
    if acc is None:
        raise TableError(f"{path}: pirate results lack 'test_acc'")
    return PirateRun(
        row=row,
        source=source,
        arch=arch,
        defense=defense,
        seed=int(seed),
        test_acc=acc,
        test_acc_peak=_number(data, "test_acc_peak", path, fraction=True),
        path=path,
        commit=_commit(data),
    )
