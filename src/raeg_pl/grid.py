"""A table's grid of runs: protection methods x pirate architectures x pirate defences x seeds.

``raeg grid --config experiments/main/quick.yaml`` runs, each stage in its own folder
under the grid's run directory and skipped when its ``results.json`` exists (an interrupted
grid resumes, and a grid split over cluster jobs with ``--rows``/``--archs`` fills one tree):

1. ``surrogate_<i>``            the surrogates, shared by every attack-based method;
2. ``pirates/clean/<arch>/none/seed<k>`` for the ``heldout`` architectures: clean-trained
                                classifiers the inference-time figures also attack;
3. ``protector_<row>``          a RAEG protector per RAEG row (its ``protector`` overrides);
4. ``methods/<row>``            the row's protected (and, if reversible, recovered) training
                                split as PNG folders, measured from the stored files;
5. ``pirates/<row>/<arch>/<defence>/seed<k>``  the pirate recipe on clean data (row
                                ``clean``) and on each row's protected files, seed by seed,
                                then ``.../authorized/seed<k>`` on the recovered files.

Every result file carries a ``grid`` entry (table, row, method, arch, defence, seed, source)
so ``raeg table`` builds the tables from the files alone; ``grid.json`` records the plan so
missing cells show as missing. A row is ``{kind: <method>, ...parameters}`` (see
:data:`raeg_pl.methods.METHODS`); RAEG rows take ``protector:`` overrides of the shared
protector config. ``reuse_from: <run dir>`` reuses the surrogates and protector of an
earlier pipeline run when their configs are identical.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import yaml

from raeg_pl.pipeline import (
    PIPELINE_KEYS,
    Pipeline,
    StageRecipeError,
    _slug,
    _stage_done,
    _stage_of,
    deep_merge,
    load_pipeline_config,
    method_export_stage,
)
from raeg_pl.utils.files import write_atomic_text

GRID_KEYS = (
    *PIPELINE_KEYS,
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
CLEAN = "clean"
ADV_TRAIN = "adv_train"


def parse_adv_train(defense: str) -> dict | None:
    """``adv_train:eps=4,steps=5`` -> ClassifierLitModule overrides; None for data defences."""
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


class Grid(Pipeline):
    """Runs one table's grid (see the module docstring).

    Args:
        cfg: the grid config (a pipeline config plus ``table``, ``rows``, ``pirates``,
            ``seeds``, ``heldout``, ``authorized_archs``, ``reuse_from``).
        run_dir: the grid's run directory (default: the config's ``run_dir``).
        rows: only these rows (and the clean baseline); None for all.
        archs: only these pirate architectures; None for all.
        defenses: only these pirate defences; None for all.
    """

    def __init__(
        self,
        cfg: dict,
        run_dir=None,
        rows: list[str] | None = None,
        archs: list[str] | None = None,
        defenses: list[str] | None = None,
    ) -> None:
        super().__init__(cfg, run_dir)
        self.table = str(cfg.get("table") or "grid")
        self.profile = cfg.get("profile")
        self.rows: dict[str, dict] = dict(cfg.get("rows") or {})
        if CLEAN in self.rows:
            raise ValueError(f"row name {CLEAN!r} is reserved for the clean-data baseline")
        pirate = cfg["pirate"]
        self.pirates: dict[str, dict] = {
            name: deep_merge(pirate, spec or {})
            for name, spec in (cfg.get("pirates") or {"pirate": {}}).items()
        }
        for only, known, what in ((rows, self.rows, "rows"), (archs, self.pirates, "archs")):
            unknown = set(only or []) - set(known)
            if unknown:
                raise ValueError(f"unknown {what} {sorted(unknown)}; known: {list(known)}")
        self.only_rows = rows
        self.only_archs = archs
        self.defenses = list(cfg.get("pirate_defenses") or ["none"])
        unknown = set(defenses or []) - set(self.defenses)
        if unknown:
            raise ValueError(f"unknown defences {sorted(unknown)}; known: {self.defenses}")
        self.only_defenses = defenses
        for d in self.defenses:
            parse_adv_train(d)
        self.seeds = [int(s) for s in cfg.get("seeds") or [0]]
        self.heldout = list(cfg.get("heldout") or [])
        # Rows whose pirates are trained (default: all); fidelity and inference-time grids
        # need the method stages and the clean classifiers only.
        pirate_rows = cfg.get("pirate_rows")
        self.pirate_rows = list([CLEAN, *self.rows] if pirate_rows is None else pirate_rows)
        # The pirates this table trains (default: all); held-out classifiers are trained
        # on clean data whatever this says.
        self.archs = list(cfg.get("archs") or self.pirates)
        self.authorized_archs = list(cfg.get("authorized_archs") or self.archs[:1])
        for what, names in (
            ("heldout", self.heldout),
            ("authorized_archs", self.authorized_archs),
            ("archs", self.archs),
        ):
            if set(names) - set(self.pirates):
                raise ValueError(f"{what} {names} must name pirates: {list(self.pirates)}")
        self.eval_defenses = list(cfg.get("eval_defenses") or ["none", "jpeg:q=75", "gray"])

    # ------------------------------------------------------------------ plan
    def plan(self) -> dict:
        """What the grid holds (written to ``grid.json``; tables use it for missing cells)."""
        return {
            "table": self.table,
            "profile": self.profile,
            "rows": [CLEAN, *self.rows],
            "methods": self.rows,
            "archs": self.archs,
            "defenses": self.defenses,
            "seeds": self.seeds,
            "eval_defenses": self.eval_defenses,
            "heldout": self.heldout,
            "authorized_archs": self.authorized_archs,
            "pirate_rows": self.pirate_rows,
        }

    def write_plan(self) -> dict:
        """Adds this table's plan to ``grid.json``, which every table of the folder shares.

        The top level holds the union of all tables' rows, archs, defences and seeds (first
        seen order); ``tables`` holds each table's own plan.
        """
        path = self.run_dir / "grid.json"
        merged = json.loads(path.read_text()) if path.is_file() else {}
        plan = self.plan()
        tables = {**merged.get("tables", {}), self.table: plan}
        keys = ("rows", "archs", "defenses", "seeds", "eval_defenses", "heldout")
        for key in (*keys, "authorized_archs", "pirate_rows"):
            seen = list(merged.get(key, []))
            merged[key] = seen + [x for x in plan[key] if x not in seen]
        merged["methods"] = {**merged.get("methods", {}), **plan["methods"]}
        merged.update(table=self.table, profile=self.profile, tables=tables)
        write_atomic_text(path, json.dumps(merged, indent=1) + "\n")
        return merged

    def _wandb(self, row: str, stage: str, seed: int | None = None) -> dict | None:
        from raeg_pl.utils.trainer import wandb_settings

        table = f"{self.table}-{self.profile}" if self.profile else self.table
        return wandb_settings(
            self.wandb, table=table, row=row, seed=seed, stage=stage, profile=self.profile
        )

    # ------------------------------------------------------------------ reuse
    def _reuse(self, name: str, link_as: str, expect: dict) -> None:
        """Links an earlier pipeline run's finished stage when its config sections match."""
        root = self.cfg.get("reuse_from")
        if not root or (self.run_dir / link_as).exists():
            return
        src, cfg_path = Path(root) / name, Path(root) / "pipeline_config.yaml"
        if not (_stage_done(src) and cfg_path.is_file()):
            return
        other = yaml.safe_load(cfg_path.read_text()) or {}
        differ = sorted(k for k, v in expect.items() if other.get(k) != v)
        if differ:
            self._say(f"{link_as}: not reused from {root}: {differ} differ")
            return
        (self.run_dir / link_as).symlink_to(src.resolve(), target_is_directory=True)
        self._say(f"{link_as}: reused from {src}")

    def _shared_keys(self) -> dict:
        return {k: self.cfg.get(k) for k in ("data", "trainer", "seed", "surrogates")}

    # ------------------------------------------------------------------ stages
    def shared_surrogates(self) -> list[Path]:
        for i in range(len(self.cfg["surrogates"])):
            self._reuse(f"surrogate_{i}", f"surrogate_{i}", self._shared_keys())
        return self.surrogates()

    def row_protector(self, row: str, spec: dict, surrogates: list[Path]) -> Path:
        pspec = deep_merge(self.cfg["protector"], spec.get("protector") or {})
        name = f"protector_{row}"
        expect = {**self._shared_keys(), "protector": pspec}
        # The earlier run's config has no subset: only a row using every surrogate matches.
        expect["surrogate_subset"] = spec.get("surrogates")
        self._reuse("protector", name, expect)
        return self.protector(surrogates, name=name, spec=pspec)

    def method_stage(self, row: str, spec: dict, surrogates: list[Path]) -> dict:
        from raeg_pl.data.datamodule import ImageClassificationDataModule
        from raeg_pl.lit.protector import load_surrogate
        from raeg_pl.methods import create_method

        spec = deep_merge(self.cfg.get("method_defaults") or {}, spec)
        params = {k: v for k, v in spec.items() if k not in ("protector", "surrogates")}
        # A row may attack (or train its protector against) a subset of the surrogates.
        picked = spec.get("surrogates")
        surrogates = [surrogates[int(i)] for i in picked] if picked is not None else surrogates
        if params.get("kind") == "raeg":
            params["checkpoint"] = str(self.row_protector(row, spec, surrogates))

        def run(stage_dir):
            import torch

            dm = ImageClassificationDataModule(**self.data_cfg)
            dm.setup()
            models = [load_surrogate(p) for p in surrogates]
            device = "cuda" if torch.cuda.is_available() else "cpu"
            method = create_method(params, models, device=device, seed=self.seed)
            heldout = {}
            for arch in self.heldout:
                ckpt = self._pirate_dir(CLEAN, arch, "none", self.seeds[0]) / "checkpoints"
                if (ckpt / "last.ckpt").is_file():
                    heldout[arch] = load_surrogate(ckpt / "last.ckpt")
                else:
                    self._say(f"held-out classifier {arch}: no clean run yet, left out")
            return method_export_stage(
                stage_dir,
                method,
                dm,
                self.eval_defenses,
                models[0],
                heldout,
                data_cfg=self.data_cfg,
                inference_per_class=self.cfg.get("inference_per_class"),
                extra={
                    "grid": {
                        "kind": "method",
                        "table": self.table,
                        "row": row,
                        "method": params["kind"],
                    }
                },
            )

        heldout_stages = [self._pirate_dir(CLEAN, a, "none", self.seeds[0]) for a in self.heldout]
        recipe = {
            "stage": "method",
            "spec": spec,
            "data": self.data_cfg,
            "eval_defenses": self.eval_defenses,
            "inference_per_class": self.cfg.get("inference_per_class"),
            "upstream": {
                "protector": self.recipes.get(f"protector_{row}"),
                "surrogates": [self.recipes.get(_stage_of(p)) for p in surrogates],
                "heldout": [
                    self.recipes.get(str(d.relative_to(self.run_dir))) for d in heldout_stages
                ],
            },
        }
        return self._stage(f"methods/{row}", run, recipe)

    def _pirate_dir(self, row: str, arch: str, defense: str, seed: int, source: str = "") -> Path:
        leaf = "authorized" if source == "recovered" else _slug(defense)
        return self.run_dir / "pirates" / row / arch / leaf / f"seed{seed}"

    def pirate_stage(self, row: str, arch: str, defense: str, seed: int, source: str) -> dict:
        folder = {
            "clean": ("methods", CLEAN, "clean"),
            "protected": ("methods", row, "protected"),
            "recovered": ("methods", row, "recovered"),
        }[source]
        spec = self.pirates[arch]
        adv = parse_adv_train(defense)
        if adv:
            spec = deep_merge(spec, {"model": adv})
        data = {
            "train_dir": str(self.run_dir.joinpath(*folder) / "train"),
            "train_defense": None if (adv or defense == "none") else defense,
            "train_per_class": None,
        }
        stage_dir = self._pirate_dir(row, arch, defense, seed, source)
        grid = {
            "kind": "pirate",
            "table": self.table,
            "row": row,
            "method": CLEAN if row == CLEAN else self.rows[row].get("kind"),
            "arch": arch,
            "defense": defense,
            "seed": seed,
            "source": source,
        }

        def run(stage_dir):
            return self._train(
                stage_dir,
                spec,
                100 + seed,
                data,
                extra={"grid": grid, "source": source, "defense": defense},
                wandb=self._wandb(row, f"pirate-{arch}-{_slug(defense)}", seed),
            )

        upstream = None if source == "clean" else self.recipes.get(f"methods/{row}")
        recipe = self.classifier_recipe(spec, 100 + seed, source, defense, upstream)
        return self._stage(str(stage_dir.relative_to(self.run_dir)), run, recipe)

    def clean_export(self) -> None:
        from raeg_pl.data.datamodule import ImageClassificationDataModule
        from raeg_pl.io.protected import is_complete, write_image_folder

        folder = self.run_dir / "methods" / CLEAN / "clean"
        if is_complete(folder):
            return
        dm = ImageClassificationDataModule(**self.data_cfg)
        dm.setup()
        write_image_folder(
            folder,
            dm.train_set.images,
            dm.train_set.labels,
            dm.classes,
            dm.train_files,
            kind="clean",
            extra={"data": self.data_cfg},
        )

    # ------------------------------------------------------------------ driver
    def _selected(self, items, only):
        """``items``, or the chosen ones in the order given (a job's priority)."""
        return list(items) if only is None else [x for x in only if x in items]

    def run(self) -> dict:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic_text(
            self.run_dir / "pipeline_config.yaml", yaml.safe_dump(self.cfg, sort_keys=False)
        )
        self.write_plan()
        t0 = time.perf_counter()
        archs = self._selected(self.archs, self.only_archs)
        rows = self._selected(list(self.rows), self.only_rows)
        surrogates = self.shared_surrogates()
        self.clean_export()
        # The held-out clean-trained classifiers of the inference-time table come first: every
        # method stage evaluates its protected test images on them.
        for arch in self.heldout:
            self.pirate_stage(CLEAN, arch, "none", self.seeds[0], "clean")
        reversible = {
            row: self.method_stage(row, self.rows[row], surrogates).get("reversible")
            for row in rows
        }
        # Seed-major, then defence and architecture, rows innermost: a grid stopped early
        # leaves whole columns of every table filled rather than whole rows.
        trained = [r for r in (CLEAN, *rows) if r in self.pirate_rows]
        for seed in self.seeds:
            for defense in self._selected(self.defenses, self.only_defenses):
                for arch in archs:
                    for row in trained:
                        source = "clean" if row == CLEAN else "protected"
                        self.pirate_stage(row, arch, defense, seed, source)
            for arch in archs:
                for row in trained:
                    if reversible.get(row) and arch in self.authorized_archs:
                        self.pirate_stage(row, arch, "none", seed, "recovered")
        seconds = round(time.perf_counter() - t0, 1)
        self._say(
            f"grid {self.table}: finished in {seconds} s; tables: raeg table --runs {self.run_dir}"
        )
        return {"seconds": seconds}


def _check_kwargs(where: str, given: dict, cls) -> list[str]:
    """Names in ``given`` that the constructor of ``cls`` (and its bases) does not take."""
    import inspect

    names: set[str] = set()
    for klass in getattr(cls, "__mro__", [cls]):
        init = klass.__dict__.get("__init__")
        if init is not None:
            names |= set(inspect.signature(init).parameters)
    return [f"{where}: unknown argument {k!r} for {cls.__name__}" for k in given if k not in names]


def validate_grid_config(cfg: dict) -> list[str]:
    """Problems that would stop a grid hours in: unknown methods, architectures, defences,
    or arguments the protector, the classifiers or a method does not take. Empty when sound.
    """
    import importlib

    import timm

    import raeg_pl.models.classifier  # noqa: F401 - registers the project's timm models
    from raeg_pl.defenses import get_defense
    from raeg_pl.lit.classifier import ClassifierLitModule
    from raeg_pl.lit.protector import ProtectorLitModule
    from raeg_pl.methods import METHODS

    problems: list[str] = []

    def classifier(where: str, spec: dict) -> None:
        model = dict(spec.get("model") or {})
        problems.extend(_check_kwargs(where, model, ClassifierLitModule))
        arch = model.get("arch")
        if arch is not None and not timm.is_model(arch):
            problems.append(f"{where}: {arch!r} is not a registered timm model")
        if "max_epochs" not in spec:
            problems.append(f"{where}: max_epochs missing")

    for i, spec in enumerate(cfg.get("surrogates") or []):
        classifier(f"surrogates.{i}", spec)
    pirate = cfg.get("pirate") or {}
    for name, spec in (cfg.get("pirates") or {"pirate": {}}).items():
        classifier(f"pirates.{name}", deep_merge(pirate, spec or {}))
    protector = (cfg.get("protector") or {}).get("model") or {}
    problems.extend(_check_kwargs("protector.model", protector, ProtectorLitModule))
    for row, spec in (cfg.get("rows") or {}).items():
        spec = deep_merge(cfg.get("method_defaults") or {}, spec or {})
        kind = spec.get("kind")
        if kind not in METHODS:
            problems.append(f"rows.{row}: unknown method kind {kind!r}; known: {sorted(METHODS)}")
            continue
        module, cls = METHODS[kind].split(":")
        params = {k: v for k, v in spec.items() if k not in ("kind", "protector", "surrogates")}
        if kind == "raeg":
            params["checkpoint"] = ""
        klass = getattr(importlib.import_module(module), cls)
        problems.extend(_check_kwargs(f"rows.{row}", params, klass))
        override = ((spec.get("protector") or {}).get("model")) or {}
        problems.extend(_check_kwargs(f"rows.{row}.protector.model", override, ProtectorLitModule))
        for i in spec.get("surrogates") or []:
            if not 0 <= int(i) < len(cfg.get("surrogates") or []):
                problems.append(f"rows.{row}.surrogates: no surrogate {i}")
    specs = [("pirate_defenses", d) for d in cfg.get("pirate_defenses") or []]
    specs += [("eval_defenses", d) for d in cfg.get("eval_defenses") or []]
    specs += [("protector.model.train_defenses", d) for d in protector.get("train_defenses") or []]
    for where, spec in specs:
        try:
            data_defense = where != "pirate_defenses" or parse_adv_train(spec) is None
            if data_defense and spec not in ("none", "identity"):
                get_defense(spec)
        except (ValueError, KeyError) as e:
            problems.append(f"{where}: {spec!r}: {e}")
    return problems


def load_grid_config(path, overrides: list[str] | None = None) -> dict:
    """A grid config (its ``defaults:`` chain merged, ``a.b=value`` overrides applied)."""
    return load_pipeline_config(path, overrides, keys=GRID_KEYS)


def main(args: list[str]) -> int:
    """``raeg grid --config FILE [--run_dir DIR] [key=value ...] [--rows R ..] [--archs A ..]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="raeg grid", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--config", required=True, help="grid YAML (experiments/<table>/<profile>.yaml)"
    )
    ap.add_argument("--run_dir", default=None, help="grid run directory (default: the config's)")
    ap.add_argument("--rows", nargs="+", default=None, help="only these method rows")
    ap.add_argument("--archs", nargs="+", default=None, help="only these pirate architectures")
    ap.add_argument("--defenses", nargs="+", default=None, help="only these pirate defences")
    ap.add_argument("--tables", default=None, help="build the tables into this folder afterwards")
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. seeds=[0,1,2]")
    ap.add_argument("--check", action="store_true", help="only validate the config and exit")
    ap.add_argument(
        "--plan",
        action="store_true",
        help="only record this table's plan in the folder's grid.json (what raeg table counts "
        "as planned) and exit; e.g. after jobs that ran parts of it with overrides",
    )
    ns = ap.parse_args(args)
    cfg = load_grid_config(ns.config, ns.overrides)
    grid = Grid(cfg, ns.run_dir, rows=ns.rows, archs=ns.archs, defenses=ns.defenses)
    problems = validate_grid_config(cfg)
    if problems:
        print(f"raeg grid: {ns.config}:\n  " + "\n  ".join(problems), flush=True)
        return 2
    if ns.check:
        print(f"raeg grid: {ns.config}: valid ({len(grid.plan()['rows'])} rows)", flush=True)
        return 0
    if ns.plan:
        grid.run_dir.mkdir(parents=True, exist_ok=True)
        grid.write_plan()
        print(f"raeg grid: plan of table {grid.table!r} written to {grid.run_dir / 'grid.json'}")
        return 0
    try:
        grid.run()
    except StageRecipeError as e:
        print(f"raeg grid: {e}", file=sys.stderr, flush=True)
        return 2
    if ns.tables:
        from raeg_pl.tables import main as table_main

        return table_main(["--runs", str(grid.run_dir), "--out", ns.tables])
    return 0


__all__ = [
    "GRID_KEYS",
    "Grid",
    "load_grid_config",
    "main",
    "parse_adv_train",
    "validate_grid_config",
]
