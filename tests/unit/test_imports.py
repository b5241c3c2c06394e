"""Imports flow downwards: every module imports alone, no cycles, no private names taken."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "raeg_pl"


def package_modules(src: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    mods = {}
    for path in sorted((src / package).rglob("*.py")):
        name = ".".join(path.relative_to(src).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def import_nodes(tree: ast.AST, top_level: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of a module; with ``top_level``, only those run on import
    (function bodies are left out, ``if``/``try`` blocks at module level are not)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if top_level and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append(child)
            visit(child)

    visit(tree)
    return found


def imported(module: str, path: Path, node: ast.Import | ast.ImportFrom, mods: dict) -> list:
    """``(target module, imported name or None)`` pairs of one statement inside the package."""
    if isinstance(node, ast.Import):
        return [(a.name, None) for a in node.names if a.name in mods]
    base = node.module or ""
    if node.level:
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        parts = package.split(".")
        base = ".".join(
            parts[: len(parts) - node.level + 1] + ([node.module] if node.module else [])
        )
    if base != PACKAGE and not base.startswith(PACKAGE + "."):
        return []
    out = []
    for alias in node.names:
        full = f"{base}.{alias.name}"
        out.append((full, None) if full in mods else (base, alias.name))
    return out


def import_graph(mods: dict[str, Path], top_level: bool) -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for node in import_nodes(ast.parse(path.read_text(), str(path)), top_level):
            for target, _ in imported(m, path, node, mods):
                if target in mods and target != m:
                    edges[m].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return found


def private_imports(mods: dict[str, Path]) -> list[str]:
    """``module <- other._name`` for every private name one module takes from another."""
    out = []
    for m, path in mods.items():
        for node in import_nodes(ast.parse(path.read_text(), str(path)), top_level=False):
            for target, name in imported(m, path, node, mods):
                private = name is not None and name.startswith("_") and not name.startswith("__")
                module_private = any(
                    p.startswith("_") and not p.startswith("__") for p in target.split(".")
                )
                if target != m and (private or module_private):
                    out.append(f"{m} <- {target}{'.' + name if name else ''}")
    return out


def test_the_checks_find_a_cycle_and_a_private_import(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from raeg_pl.b import _helper\n")
    (pkg / "b.py").write_text("import raeg_pl.sub.c\n\ndef f():\n    import raeg_pl.a\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from .. import a\n")
    mods = package_modules(tmp_path)
    assert cycles(import_graph(mods, top_level=True)) == [
        ["raeg_pl.a", "raeg_pl.b", "raeg_pl.sub.c"]
    ]
    assert private_imports(mods) == ["raeg_pl.a <- raeg_pl.b._helper"]
    (pkg / "sub" / "c.py").write_text("")
    assert cycles(import_graph(mods, top_level=True)) == []
    # b imports a lazily and a imports b on import: a circle all the same.
    assert cycles(import_graph(mods, top_level=False)) == [["raeg_pl.a", "raeg_pl.b"]]


def test_no_import_cycles_at_module_level():
    assert cycles(import_graph(package_modules(), top_level=True)) == []


def test_no_import_cycles_through_deferred_imports_either():
    # A function-level import only postpones a circle (cli -> pipeline -> cli once did).
    assert cycles(import_graph(package_modules(), top_level=False)) == []


def test_no_module_takes_another_modules_private_names():
    assert private_imports(package_modules()) == []


def test_every_module_imports_alone():
    """Each module imports with no other module of the package loaded before it."""
    names = sorted(package_modules())
    script = textwrap.dedent(
        """
        import importlib, json, sys, traceback
        failed = {}
        for name in json.loads(sys.argv[1]):
            for loaded in [m for m in sys.modules if m == "raeg_pl" or m.startswith("raeg_pl.")]:
                del sys.modules[loaded]
            try:
                importlib.import_module(name)
            except Exception:
                failed[name] = traceback.format_exc(limit=-3)
        print(json.dumps(failed))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, json.dumps(names)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert failed == {}, "\n".join(f"{k}:\n{v}" for k, v in failed.items())
    assert len(names) > 30


@pytest.mark.parametrize("module", ["raeg_pl.config", "raeg_pl.cli"])
def test_config_and_the_entry_point_load_without_lightning(module):
    # `raeg protect` and config checks must start without the training stack.
    code = f"import sys, {module}; print('lightning' in sys.modules, 'torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "False"]
