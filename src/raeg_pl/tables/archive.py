"""Result records that outlive the machine: the small files a table is built from, kept
beside the committed table.

A grid's run directory holds gigabytes (checkpoints, exported PNG folders) and stays on the
machine that ran it; the tables need only its ``grid.json``, each stage's ``results.json``
and, to check recipes later, each stage's ``recipe.json``. ``raeg table ... --keep-records
DIR`` copies those of every result the tables used into ``DIR/<run folder name>/`` with the
run directory's layout, so ``DIR/<name>`` is itself a run directory that ``raeg table
--runs`` reads, and a later session on a fresh machine rebuilds (or extends) the table from
the records committed with it::

    raeg table --runs docs/tables/T/records/* runs/tables/T --out docs/tables/T \\
        --keep-records docs/tables/T/records

Absolute paths of the machine inside the records (data roots, caches, the checkout) are
written as ``$RAEG_DATA_DIR``, ``$RAEG_CACHE_DIR``, ``.`` (the working directory) and ``~``,
so committed records name no machine's folders. A record already kept is replaced only by a
newer copy of the same run (same relative path); records of other runs stay.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from raeg_pl.tables.records import TableError
from raeg_pl.tables.results import Results
from raeg_pl.utils.files import PLAN_FILE, RECIPE_FILE, RESULTS_FILE, write_atomic_text


def path_tokens() -> list[tuple[str, str]]:
    """(absolute prefix, token) pairs, longest prefix first: the data and cache roots from
    the environment, the working directory and the home folder."""
    pairs = []
    for var in ("RAEG_DATA_DIR", "RAEG_CACHE_DIR"):
        if os.environ.get(var):
            pairs.append((str(Path(os.environ[var]).resolve()), f"${var}"))
            pairs.append((os.environ[var].rstrip("/"), f"${var}"))
    pairs.append((str(Path.cwd().resolve()), "."))
    pairs.append((str(Path.home().resolve()), "~"))
    pairs = [(p, t) for p, t in pairs if p not in ("", "/")]
    return sorted(set(pairs), key=lambda pt: -len(pt[0]))


def scrub(value: Any, tokens: list[tuple[str, str]]) -> Any:
    """``value`` with every string that starts with one of the absolute prefixes rewritten
    to its token (recursively through dicts and lists)."""
    if isinstance(value, dict):
        return {k: scrub(v, tokens) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, tokens) for v in value]
    if isinstance(value, str):
        for prefix, token in tokens:
            if value == prefix or value.startswith(prefix + "/"):
                return token + value[len(prefix) :]
    return value


def _relative(path: Path, folder: Path) -> Path | None:
    """``path`` relative to ``folder`` (as written, else resolved); None when outside it."""
    for p, f in ((path, folder), (path.resolve(), folder.resolve())):
        try:
            return p.relative_to(f)
        except ValueError:
            pass
    return None


def _copy_json(src: Path, dst: Path, tokens: list[tuple[str, str]]) -> bool:
    """Writes ``src``'s JSON scrubbed to ``dst`` (atomically); False when ``dst`` already
    holds exactly that."""
    try:
        data = json.loads(src.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TableError(f"{src}: cannot read JSON to keep as a record ({e})") from e
    text = json.dumps(scrub(data, tokens), indent=2, sort_keys=True) + "\n"
    if dst.is_file() and dst.read_text() == text:
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_atomic_text(dst, text)
    return True


def record_names(run_dirs: list[Path], dest: Path) -> dict[Path, str]:
    """Each run directory outside ``dest`` -> its records folder name under ``dest``.

    That is its own folder name (a run directory kept again updates its records), with
    ``-2``, ``-3`` ... added when another run directory of the call has the name, or when
    the records folder of that name is itself read back in this call (a later session's run
    of the same grid, on another machine, extends the records beside it).
    """
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for d in run_dirs:
        rel = _relative(d, dest)
        if rel is not None and rel.parts:
            taken.add(rel.parts[0])
    for d in run_dirs:
        if _relative(d, dest) is not None:
            continue
        name, n = d.name, 1
        while name in taken:
            n += 1
            name = f"{d.name}-{n}"
        taken.add(name)
        names[d] = name
    return names


def keep_records(res: Results, dest: str | Path) -> list[Path]:
    """Copies the plan, results and recipes behind ``res`` into ``dest`` (see the module
    docstring); returns the files written (unchanged ones are not rewritten).

    Only the results the tables used are kept: a duplicate run that an earlier run
    directory already gave is not. Run directories that already lie inside ``dest`` (its
    records, read back) are left as they are.
    """
    dest = Path(dest)
    tokens = path_tokens()
    names = record_names(res.run_dirs, dest)
    used = {m["path"] for m in res.methods.values()}
    used |= {run.path for cell in res.pirates.values() for run in cell.values()}
    written: list[Path] = []
    for d, plan in zip(res.run_dirs, res.grids, strict=True):
        if d not in names:
            continue
        out = dest / names[d]
        files = [plan.path] if plan.path.name == PLAN_FILE else []
        for f in sorted(used):
            if _relative(f, d) is not None:
                files.append(f)
                recipe = f.parent / RECIPE_FILE
                if recipe.is_file():
                    files.append(recipe)
        for f in files:
            target = out / _relative(f, d)
            if _copy_json(f, target, tokens):
                written.append(target)
    return written


def record_folders(paths: list[str | Path]) -> list[Path]:
    """Kept records' folders: each path that is one (it holds ``grid.json``, ``methods/`` or
    ``pirates/``), else its sub-folders that are, in name order.

    Raises:
        TableError: a path that is not a folder or holds no records.
    """
    out: list[Path] = []

    def is_records(d: Path) -> bool:
        return (d / PLAN_FILE).is_file() or (d / "methods").is_dir() or (d / "pirates").is_dir()

    for p in map(Path, paths):
        if not p.is_dir():
            raise TableError(f"records folder not found: {p}")
        found = [p] if is_records(p) else [d for d in sorted(p.iterdir()) if is_records(d)]
        if not found:
            raise TableError(
                f"{p}: holds no kept records (expected grid.json, methods/ or pirates/, "
                "itself or in its sub-folders; see raeg table --keep-records)"
            )
        out += found
    return out


def read_kept(paths: list[str | Path]) -> dict[str, tuple[Path, str | None]]:
    """Stage name (``methods/<row>``, ``pirates/<row>/<arch>/<defence>/seed<k>``) -> (the
    kept folder, its recipe hash or None) for every kept stage; the first folder of
    :func:`record_folders` that holds a stage wins."""
    kept: dict[str, tuple[Path, str | None]] = {}
    for folder in record_folders(paths):
        for f in sorted(folder.rglob(RESULTS_FILE)):
            name = f.parent.relative_to(folder).as_posix()
            if name in kept:
                continue
            digest = None
            recipe = f.parent / RECIPE_FILE
            if recipe.is_file():
                try:
                    digest = json.loads(recipe.read_text()).get("hash")
                except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise TableError(f"{recipe}: cannot read the kept recipe ({e})") from e
            kept[name] = (f.parent, digest)
    return kept
