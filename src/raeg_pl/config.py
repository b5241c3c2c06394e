"""Experiment configuration: YAML files with ``defaults:`` chains, overrides, merging, checks.

A config file may start with ``defaults: [relative/base.yaml, ...]``; the named files are
applied first, in order, then the file itself, so an experiment is one small override file
on top of the presets in ``experiments/_base/``. ``raeg fit|validate|test|predict`` hand the
chain to LightningCLI as one ``--config`` per level (:func:`expand_config_args`);
``raeg pipeline`` and ``raeg grid`` merge it into one mapping (:func:`load_pipeline_config`)
and then apply ``a.b.c=value`` overrides from the command line.

Stage recipes (the config sections that determine a stage's output) are compared through
:func:`normalise_recipe` and :func:`recipe_differences`. :func:`validate_grid_config`
checks names (methods, architectures, defences, constructor arguments) without building
anything; :mod:`raeg_pl.stages.check` builds the networks.

This module imports neither torch nor Lightning at import time.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import yaml

PIPELINE_KEYS = (
    "run_dir",
    "seed",
    "trainer",
    "data",
    "surrogates",
    "protector",
    "pirate",
    "pirate_defenses",
    "eval_defenses",
    "export",
    "wandb",
    "profile",
    "description",
)
# The pipeline's ``export`` section: how its protector is applied to the training split. A
# grid sets the same per RAEG row (a method argument), so grids do not take the section.
EXPORT_KEYS = ("refine_steps",)
GRID_KEYS = (
    *(k for k in PIPELINE_KEYS if k != "export"),
    "table",
    "rows",
    "pirates",
    "seeds",
    "heldout",
    "authorized_archs",
    "reuse_from",
    "method_defaults",
    "pirate_rows",
    "archs",
    "inference_per_class",
)
# Keys that locate files or only change what is printed: not part of any stage's recipe.
NOT_RECIPE = frozenset({"data_dir", "cache_dir", "num_workers", "enable_progress_bar"})
# Row keys the grid reads itself; every other key of a row is a method constructor argument.
# ``label`` is the row's display name in the tables: never a method argument, never hashed.
ROW_KEYS = ("kind", "protector", "surrogates", "label")
ADV_TRAIN = "adv_train"
DEFAULT_EVAL_DEFENSES = ("none", "jpeg:q=75", "gray")


# ------------------------------------------------------------------ files and chains
def load_config_texts(path: str | os.PathLike, seen: tuple[Path, ...] = ()) -> list[str]:
    """A config file and its ``defaults`` chain as YAML texts, bases first.

    Args:
        path: the YAML file.
        seen: the files that led here (for the circularity check).

    Raises:
        FileNotFoundError: ``path`` or a base it names does not exist.
        ValueError: a circular chain, or a file that does not hold a mapping.
    """
    path = Path(path).resolve()
    if path in seen:
        raise ValueError(f"{path}: circular 'defaults' chain through {[str(p) for p in seen]}")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping, got {type(data).__name__}")
    texts: list[str] = []
    for base in defaults_of(path, data):
        texts += load_config_texts(path.parent / base, (*seen, path))
    data.pop("defaults", None)
    if data:
        texts.append(yaml.safe_dump(data, sort_keys=False))
    return texts


def defaults_of(path: str | os.PathLike, data: dict | None = None) -> list[str]:
    """The ``defaults:`` entries of a config file, as written (relative to its folder)."""
    if data is None:
        data = yaml.safe_load(Path(path).read_text()) or {}
    bases = data.get("defaults", []) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ValueError(f"{path}: 'defaults' must be a file name or a list of file names")
    return bases


def load_config(path: str | os.PathLike) -> dict:
    """A config file with its ``defaults`` chain merged into one mapping (no key checks)."""
    cfg: dict = {}
    for text in load_config_texts(path):
        cfg = deep_merge(cfg, yaml.safe_load(text) or {})
    return cfg


def expand_config_args(args: list[str]) -> list[str]:
    """Replaces each ``--config FILE`` by its ``defaults`` chain, one ``--config`` per level."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        value = None
        if arg == "--config" and i + 1 < len(args):
            value, i = args[i + 1], i + 2
        elif arg.startswith("--config="):
            value, i = arg.split("=", 1)[1], i + 1
        else:
            out.append(arg)
            i += 1
            continue
        if Path(value).suffix in (".yaml", ".yml") and Path(value).is_file():
            for text in load_config_texts(Path(value)):
                out += ["--config", text]
        else:
            out += ["--config", value]
    return out


# ------------------------------------------------------------------ merging and overrides
def deep_merge(base: dict, override: dict) -> dict:
    """``override`` merged into a copy of ``base``; mappings merge, everything else replaces."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = (
            deep_merge(out[k], v)
            if isinstance(v, dict) and isinstance(out.get(k), dict)
            else copy.deepcopy(v)
        )
    return out


def parse_override(value: str) -> Any:
    """A YAML value; numbers YAML 1.1 reads as text (``5e-05``, as sweep agents write) too."""
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str):
        try:
            return float(parsed)
        except ValueError:
            return parsed
    return parsed


def apply_overrides(cfg: dict, overrides: list[str] | None) -> dict:
    """``cfg`` with ``a.b.c=value`` overrides applied in place (list items by index).

    Raises:
        ValueError: an override without ``=``.
    """
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key.path=value")
        key, value = item.split("=", 1)
        node: Any = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        last = parts[-1]
        parsed = parse_override(value)
        if isinstance(node, list):
            node[int(last)] = parsed
        else:
            node[last] = parsed
    return cfg


def load_pipeline_config(
    path: str | os.PathLike, overrides: list[str] | None = None, keys: tuple[str, ...] | None = None
) -> dict:
    """A pipeline config with its ``defaults:`` chain merged, then ``a.b.c=value`` overrides.

    Args:
        path: the experiment file.
        overrides: ``key.path=value`` items, applied in order.
        keys: the top-level keys allowed (default :data:`PIPELINE_KEYS`).

    Raises:
        ValueError: a top-level key outside ``keys`` (named with the file).
    """
    cfg = apply_overrides(load_config(path), overrides)
    keys = keys or PIPELINE_KEYS
    unknown = set(cfg) - set(keys)
    if unknown:
        hint = " (a grid sets refine_steps on its RAEG rows)" if "export" in unknown else ""
        raise ValueError(f"{path}: unknown config keys {sorted(unknown)}; valid: {keys}{hint}")
    try:
        export_settings(cfg)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return cfg


def export_settings(cfg: dict) -> dict:
    """The pipeline's ``export`` section, checked: ``{"refine_steps": int >= 0}``.

    ``refine_steps`` (default 0) is the restore-aware rounding of the protected training
    split (:func:`raeg_pl.io.apply.restore_aware_rounding`).

    Raises:
        ValueError: an unknown key, or a value that is not a non-negative integer.
    """
    section = cfg.get("export") or {}
    if not isinstance(section, dict):
        raise ValueError(f"export: expected a mapping, got {section!r}")
    unknown = sorted(set(section) - set(EXPORT_KEYS))
    if unknown:
        raise ValueError(f"export: unknown keys {unknown}; valid: {list(EXPORT_KEYS)}")
    steps = section.get("refine_steps", 0)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"export.refine_steps: expected an integer >= 0, got {steps!r}")
    return {"refine_steps": steps}


def load_grid_config(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """A grid config (its ``defaults:`` chain merged, ``a.b=value`` overrides applied)."""
    return load_pipeline_config(path, overrides, keys=GRID_KEYS)


# ------------------------------------------------------------------ recipes
def normalise_recipe(recipe: Any) -> Any:
    """``recipe`` as plain JSON values, without the keys of :data:`NOT_RECIPE`."""
    if isinstance(recipe, dict):
        return {str(k): normalise_recipe(v) for k, v in recipe.items() if k not in NOT_RECIPE}
    if isinstance(recipe, (list, tuple)):
        return [normalise_recipe(v) for v in recipe]
    return json.loads(json.dumps(recipe, default=str))


def recipe_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys at which two normalised recipes differ (``old`` may be anything)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            if k not in old or k not in new:
                out.append(prefix + k)
            else:
                out += recipe_differences(old[k], new[k], f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".") or "(whole recipe)"]


# ------------------------------------------------------------------ grid sections
def parse_adv_train(defense: str) -> dict | None:
    """``adv_train:eps=4,steps=5`` -> ClassifierLitModule overrides; None for data defences.

    Raises:
        ValueError: an argument other than ``eps`` and ``steps``.
    """
    name, _, params = defense.partition(":")
    if name != ADV_TRAIN:
        return None
    out = {"adv_train_eps": 8.0}
    for item in filter(None, params.split(",")):
        key, _, value = item.partition("=")
        if key not in ("eps", "steps"):
            raise ValueError(f"{defense!r}: adv_train takes eps= and steps=, got {key!r}")
        out[f"adv_train_{key}"] = float(value) if key == "eps" else int(value)
    return out


def parse_pirate_defense(spec: str):
    """A grid's ``pirate_defenses`` entry as a :class:`raeg_pl.defenses.pirate.PirateDefense`.

    What it changes: the data once (an image defence: ``.data``), the data with labels or
    leaked pairs (``classpattern``, ``inverse``: ``.data``), or the training loop
    (``adv_train``, ``ueraser``: ``.model``, classifier overrides); see
    :mod:`raeg_pl.defenses.pirate`. Imports torch when called.

    Raises:
        ValueError: a malformed or unknown spec, named, with the valid ones.
    """
    from raeg_pl.defenses.pirate import parse_pirate_defense as parse

    return parse(spec)


def grid_pirates(cfg: dict) -> dict[str, dict]:
    """Each pirate architecture's classifier spec: ``pirate`` merged with its entry."""
    pirate = cfg.get("pirate") or {}
    return {
        name: deep_merge(pirate, spec or {})
        for name, spec in (cfg.get("pirates") or {"pirate": {}}).items()
    }


def row_spec(cfg: dict, spec: dict | None) -> dict:
    """A grid row with ``method_defaults`` applied under it."""
    return deep_merge(cfg.get("method_defaults") or {}, spec or {})


def row_method_params(spec: dict) -> dict:
    """The method's part of a merged row: ``kind`` and the constructor arguments."""
    return {k: v for k, v in spec.items() if k not in ("protector", "surrogates", "label")}


def row_protector_spec(cfg: dict, spec: dict) -> dict:
    """The protector config a RAEG row trains: the shared one with the row's overrides."""
    return deep_merge(cfg["protector"], spec.get("protector") or {})


# ------------------------------------------------------------------ validation
def _constructor_problems(where: str, given: dict, cls) -> list[str]:
    """Names in ``given`` that the constructor of ``cls`` (and its bases) does not take."""
    import inspect

    names: set[str] = set()
    for klass in getattr(cls, "__mro__", [cls]):
        init = klass.__dict__.get("__init__")
        if init is not None:
            names |= set(inspect.signature(init).parameters)
    return [f"{where}: unknown argument {k!r} for {cls.__name__}" for k in given if k not in names]


def validate_grid_config(cfg: dict) -> list[str]:
    """Problems that would stop a grid hours in, found by name; empty when sound.

    Unknown methods, architectures, defences, or arguments the protector, the classifiers
    or a method does not take. Nothing is built here (see :mod:`raeg_pl.stages.check`).
    """
    import importlib

    import timm

    import raeg_pl.models.classifier  # noqa: F401 - registers the project's timm models
    from raeg_pl.defenses import get_defense
    from raeg_pl.lit.classifier import ClassifierLitModule
    from raeg_pl.lit.protector import ProtectorLitModule, parse_train_defense
    from raeg_pl.methods import METHODS

    problems: list[str] = []

    def classifier(where: str, spec: dict) -> None:
        model = dict(spec.get("model") or {})
        problems.extend(_constructor_problems(where, model, ClassifierLitModule))
        arch = model.get("arch")
        if arch is not None and not timm.is_model(arch):
            problems.append(f"{where}: {arch!r} is not a registered timm model")
        if "max_epochs" not in spec:
            problems.append(f"{where}: max_epochs missing")

    for i, spec in enumerate(cfg.get("surrogates") or []):
        classifier(f"surrogates.{i}", spec)
    for name, spec in grid_pirates(cfg).items():
        classifier(f"pirates.{name}", spec)
    protector = (cfg.get("protector") or {}).get("model") or {}
    problems.extend(_constructor_problems("protector.model", protector, ProtectorLitModule))
    for row, spec in (cfg.get("rows") or {}).items():
        spec = row_spec(cfg, spec)
        kind = spec.get("kind")
        label = spec.get("label")
        if label is not None and not (isinstance(label, str) and label.strip()):
            problems.append(f"rows.{row}.label: must be a non-empty string, got {label!r}")
        if kind not in METHODS:
            problems.append(f"rows.{row}: unknown method kind {kind!r}; known: {sorted(METHODS)}")
            continue
        module, cls = METHODS[kind].split(":")
        params = {k: v for k, v in spec.items() if k not in ROW_KEYS}
        if kind == "raeg":
            params["checkpoint"] = ""
        klass = getattr(importlib.import_module(module), cls)
        problems.extend(_constructor_problems(f"rows.{row}", params, klass))
        override = ((spec.get("protector") or {}).get("model")) or {}
        problems.extend(
            _constructor_problems(f"rows.{row}.protector.model", override, ProtectorLitModule)
        )
        for i in spec.get("surrogates") or []:
            if not 0 <= int(i) < len(cfg.get("surrogates") or []):
                problems.append(f"rows.{row}.surrogates: no surrogate {i}")
    for spec in cfg.get("pirate_defenses") or []:
        try:
            parse_pirate_defense(spec)
        except ValueError as e:
            problems.append(f"pirate_defenses: {spec!r}: {e}")
    specs = [("eval_defenses", d, get_defense) for d in cfg.get("eval_defenses") or []]
    specs += [
        ("protector.model.train_defenses", d, parse_train_defense)
        for d in protector.get("train_defenses") or []
    ]
    for where, spec, parse in specs:
        try:
            if spec not in ("none", "identity"):
                parse(spec)
        except (ValueError, KeyError) as e:
            problems.append(f"{where}: {spec!r}: {e}")
    return problems


__all__ = [
    "ADV_TRAIN",
    "DEFAULT_EVAL_DEFENSES",
    "EXPORT_KEYS",
    "GRID_KEYS",
    "NOT_RECIPE",
    "PIPELINE_KEYS",
    "ROW_KEYS",
    "apply_overrides",
    "deep_merge",
    "defaults_of",
    "expand_config_args",
    "export_settings",
    "grid_pirates",
    "load_config",
    "load_config_texts",
    "load_grid_config",
    "load_pipeline_config",
    "normalise_recipe",
    "parse_adv_train",
    "parse_override",
    "parse_pirate_defense",
    "recipe_differences",
    "row_method_params",
    "row_protector_spec",
    "row_spec",
    "validate_grid_config",
]
