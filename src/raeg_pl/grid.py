"""A table's grid of runs: protection methods x pirate architectures x pirate defences x seeds.

``raeg grid --config experiments/main/quick.yaml`` runs, each stage in its own folder
under the grid's run directory and skipped when its ``results.json`` exists (an interrupted
grid resumes, and a grid split over cluster jobs with ``--rows``/``--archs`` fills one tree):

1. ``surrogate_<i>``            the surrogates, shared by every attack-based method;
2. ``pirates/clean/<arch>/none/seed<k>`` for the ``heldout`` architectures: clean-trained
                                classifiers the inference-time figures also attack;
3. ``protector_<row>``          a RAEG protector per RAEG row (its ``protector`` overrides);
                                rows with the same protector recipe share the first one's;
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

``raeg grid --records DIR`` resumes from the records that ``raeg table --keep-records``
kept (a fresh machine without the run directory): see :meth:`Grid.use_records`.

Before any stage runs, every row's protector and method, every surrogate and every pirate
architecture is built on a tiny input (:mod:`raeg_pl.stages.check`); a row that cannot be
built stops the grid at once, named with its error. ``raeg grid --check`` does only that
(and the name checks of :func:`raeg_pl.config.validate_grid_config`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import sys
import time
from pathlib import Path

import yaml

from raeg_pl.config import (
    DEFAULT_EVAL_DEFENSES,
    GRID_KEYS,
    deep_merge,
    grid_pirates,
    load_grid_config,
    parse_adv_train,
    parse_pirate_defense,
    row_method_params,
    row_protector_spec,
    row_spec,
    validate_grid_config,
)
from raeg_pl.stages.check import GridBuildError, check_grid_builds
from raeg_pl.stages.common import (
    StageRecipeError,
    StageRunner,
    read_stage,
    slug,
    stage_done,
    stage_of,
)
from raeg_pl.stages.export import export_clean_folder, export_method
from raeg_pl.stages.protector import run_protector
from raeg_pl.stages.surrogate import run_surrogates
from raeg_pl.tables.archive import read_kept
from raeg_pl.tables.records import TableError
from raeg_pl.utils.files import PLAN_FILE, RECIPE_FILE, RESULTS_FILE, write_atomic_text

CLEAN = "clean"
# A command-line override: `key.path=value` (no ':' before the '=').
OVERRIDE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


class Grid(StageRunner):
    """Runs one table's grid (see the module docstring).

    Args:
        cfg: the grid config (a pipeline config plus ``table``, ``rows``, ``pirates``,
            ``seeds``, ``heldout``, ``authorized_archs``, ``reuse_from``).
        run_dir: the grid's run directory (default: the config's ``run_dir``).
        rows: only these rows (and the clean baseline); None for all.
        archs: only these pirate architectures; None for all.
        defenses: only these pirate defences; None for all.
        authorized: train the authorised classifiers on recovered files (False: a worker
            of :func:`worker_jobs` whose cells another worker's job holds).
        records: kept records (``raeg table --keep-records``) the grid resumes from: see
            :meth:`use_records`.
    """

    def __init__(
        self,
        cfg: dict,
        run_dir=None,
        rows: list[str] | None = None,
        archs: list[str] | None = None,
        defenses: list[str] | None = None,
        authorized: bool = True,
        records: list[str] | None = None,
    ) -> None:
        super().__init__(cfg, run_dir)
        self.authorized = authorized
        self.records = list(records or [])
        self.table = str(cfg.get("table") or "grid")
        self.profile = cfg.get("profile")
        self.rows: dict[str, dict] = dict(cfg.get("rows") or {})
        if CLEAN in self.rows:
            raise ValueError(f"row name {CLEAN!r} is reserved for the clean-data baseline")
        if "pirate" not in cfg:
            raise ValueError("a grid config needs a 'pirate' section (the classifier recipe)")
        self.pirates: dict[str, dict] = grid_pirates(cfg)
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
        outside = [a for a in archs or [] if a not in self.archs]
        if outside:
            raise ValueError(
                f"--archs {outside}: not among this table's pirates {self.archs} (it would "
                f"train nothing); add them with archs=[...]"
            )
        self.authorized_archs = list(cfg.get("authorized_archs") or self.archs[:1])
        for what, names in (
            ("heldout", self.heldout),
            ("authorized_archs", self.authorized_archs),
            ("archs", self.archs),
        ):
            if set(names) - set(self.pirates):
                raise ValueError(f"{what} {names} must name pirates: {list(self.pirates)}")
        self.eval_defenses = list(cfg.get("eval_defenses") or DEFAULT_EVAL_DEFENSES)

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
        path = self.run_dir / PLAN_FILE
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
        if self.dry or not root or (self.run_dir / link_as).exists():
            return
        src, cfg_path = Path(root) / name, Path(root) / "pipeline_config.yaml"
        if not (stage_done(src) and cfg_path.is_file()):
            return
        other = yaml.safe_load(cfg_path.read_text()) or {}
        differ = sorted(k for k, v in expect.items() if other.get(k) != v)
        if differ:
            self.say(f"{link_as}: not reused from {root}: {differ} differ")
            return
        (self.run_dir / link_as).symlink_to(src.resolve(), target_is_directory=True)
        self.say(f"{link_as}: reused from {src}")

    def _shared_keys(self) -> dict:
        return {k: self.cfg.get(k) for k in ("data", "trainer", "seed", "surrogates")}

    # ------------------------------------------------------------------ stages
    def shared_surrogates(self) -> list[Path]:
        """The surrogate stages (linked from ``reuse_from`` when they match); checkpoints."""
        for i in range(len(self.cfg["surrogates"])):
            self._reuse(f"surrogate_{i}", f"surrogate_{i}", self._shared_keys())
        return run_surrogates(self)

    @functools.cached_property
    def _protector_owners(self) -> dict[str, str]:
        """RAEG row -> the first row with the same protector recipe and surrogates."""
        owners: dict[str, str] = {}
        first: dict[str, str] = {}
        for name, raw in self.rows.items():
            spec = row_spec(self.cfg, raw)
            if spec.get("kind") == "raeg":
                key = json.dumps(
                    [row_protector_spec(self.cfg, spec), spec.get("surrogates")],
                    sort_keys=True,
                    default=str,
                )
                owners[name] = first.setdefault(key, name)
        return owners

    def protector_owner(self, row: str) -> str:
        """The row whose ``protector_<row>`` stage a RAEG row uses: the first row of the grid
        with the same protector recipe and surrogates (itself, unless an earlier row trains
        the same protector, e.g. a row that only changes ``refine_steps``)."""
        return self._protector_owners.get(row, row)

    def row_protector(self, row: str, spec: dict, surrogates: list[Path]) -> Path:
        """A RAEG row's protector stage (linked when it matches); its checkpoint.

        ``protector_<owner>`` with :meth:`protector_owner`: rows with the same protector
        recipe share one fit."""
        pspec = row_protector_spec(self.cfg, spec)
        owner = self.protector_owner(row)
        name = f"protector_{owner}"
        if owner != row:
            self.say(f"{row}: uses the protector of row {owner} (same protector recipe)")
        expect = {**self._shared_keys(), "protector": pspec}
        # The earlier run's config has no subset: only a row using every surrogate matches.
        expect["surrogate_subset"] = spec.get("surrogates")
        self._reuse("protector", name, expect)
        return run_protector(self, surrogates, name=name, spec=pspec)

    def method_stage(self, row: str, spec: dict, surrogates: list[Path]) -> dict:
        """The row's ``methods/<row>`` stage (and, for RAEG, its protector stage first)."""
        spec = row_spec(self.cfg, spec)
        params = row_method_params(spec)
        # A row may attack (or train its protector against) a subset of the surrogates.
        picked = spec.get("surrogates")
        surrogates = [surrogates[int(i)] for i in picked] if picked is not None else surrogates
        if params.get("kind") == "raeg":
            params["checkpoint"] = str(self.row_protector(row, spec, surrogates))
        heldout_stages = [self.heldout_dir(a) for a in self.heldout]

        def run(stage_dir):
            extra: dict = {}
            fitted = self.run_dir / f"protector_{self.protector_owner(row)}"
            if params.get("kind") == "raeg" and stage_done(fitted):
                # The protector's own fit is part of RAEG's crafting cost (the fidelity table).
                p_res = read_stage(fitted)
                extra["protector_fit_seconds"] = p_res.get("fit_seconds")
                extra["protector_train_images"] = (p_res.get("splits") or {}).get("train")
            return export_method(
                stage_dir,
                params,
                surrogates,
                {a: d / "checkpoints" / "last.ckpt" for a, d in zip(self.heldout, heldout_stages)},
                self.data_cfg,
                self.eval_defenses,
                seed=self.seed,
                inference_per_class=self.cfg.get("inference_per_class"),
                extra={
                    **extra,
                    "grid": {
                        "kind": "method",
                        "table": self.table,
                        "row": row,
                        "method": params["kind"],
                    },
                },
                say=self.say,
            )

        # A row's display label is no part of what the stage computes, nor are the optional
        # terms its protector names at their defaults.
        rec_spec = {k: v for k, v in spec.items() if k != "label"}
        if isinstance(rec_spec.get("protector"), dict):
            from raeg_pl.lit.protector import recipe_protector_spec

            rec_spec["protector"] = recipe_protector_spec(rec_spec["protector"])
        recipe = {
            "stage": "method",
            "spec": rec_spec,
            "data": self.data_cfg,
            "eval_defenses": self.eval_defenses,
            "inference_per_class": self.cfg.get("inference_per_class"),
            "upstream": {
                "protector": self.recipes.get(f"protector_{self.protector_owner(row)}"),
                "surrogates": [self.recipes.get(stage_of(p)) for p in surrogates],
                "heldout": [
                    self.recipes.get(str(d.relative_to(self.run_dir))) for d in heldout_stages
                ],
            },
        }
        return self.run_stage(f"methods/{row}", run, recipe)

    def heldout_dir(self, arch: str) -> Path:
        """The clean-trained held-out classifier ``arch`` that every method stage attacks: one
        per grid, at the grid's ``seed``, whichever pirate ``seeds`` a run or worker job trains
        (so ``seeds=[1,2]`` after ``[0]`` keeps the method stages' recipes)."""
        return self._pirate_dir(CLEAN, arch, "none", self.seed)

    def _pirate_dir(self, row: str, arch: str, defense: str, seed: int, source: str = "") -> Path:
        """``pirates/<row>/<arch>/<defence or authorized>/seed<k>`` of the grid folder."""
        leaf = "authorized" if source == "recovered" else slug(defense)
        return self.run_dir / "pirates" / row / arch / leaf / f"seed{seed}"

    def pirate_stage(self, row: str, arch: str, defense: str, seed: int, source: str) -> dict:
        """One classifier of the grid: ``arch`` on a row's ``source`` files after ``defense``."""
        folder = {
            "clean": ("methods", CLEAN, "clean"),
            "protected": ("methods", row, "protected"),
            "recovered": ("methods", row, "recovered"),
        }[source]
        spec = self.pirates[arch]
        pirate_defense = parse_pirate_defense(defense)
        # The training loop's part of the defence (adv_train, ueraser): classifier overrides.
        adv = parse_adv_train(defense) or pirate_defense.model
        if adv:
            spec = deep_merge(spec, {"model": adv})
        # Seed k sets the pirate's initialisation and DataLoader order (global seed 100 + k)
        # and its validation split and on-device order (data seed: the config's + k).
        data_seed = self.config_data_seed(spec) + seed
        data = {
            "train_dir": str(self.run_dir.joinpath(*folder) / "train"),
            "train_defense": None if (adv or defense == "none") else defense,
            "train_per_class": None,
            "seed": data_seed,
        }
        if pirate_defense.kind == "paired":  # the leaked pairs' originals: the clean export
            data["clean_train_dir"] = str(self.run_dir / "methods" / CLEAN / "clean" / "train")
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
            return self.train(
                stage_dir,
                spec,
                100 + seed,
                data,
                extra={"grid": grid, "source": source, "defense": defense},
                wandb=self._wandb(row, f"pirate-{arch}-{slug(defense)}", seed),
            )

        upstream = None if source == "clean" else self.recipes.get(f"methods/{row}")
        # classpattern and inverse record every parameter, defaults included, in the recipe.
        canonical = pirate_defense.kind in ("labelled", "paired")
        recipe_defense = pirate_defense.spec if canonical else defense
        recipe = self.classifier_recipe(
            spec, 100 + seed, source, recipe_defense, upstream, data_seed
        )
        return self.run_stage(str(stage_dir.relative_to(self.run_dir)), run, recipe)

    def clean_export(self) -> None:
        """The clean training split as PNG files (``methods/clean/clean``): the clean pirates' data."""
        if self.dry:
            return
        export_clean_folder(self.run_dir / "methods" / CLEAN / "clean", self.data_cfg)

    # ------------------------------------------------------------------ driver
    def _selected(self, items, only):
        """``items``, or the chosen ones in the order given (a job's priority)."""
        return list(items) if only is None else [x for x in only if x in items]

    def check_builds(self) -> None:
        """Builds every row, surrogate and pirate on a tiny input (:mod:`raeg_pl.stages.check`).

        Raises:
            GridBuildError: the parts that cannot be built, each named with its error.
        """
        t0 = time.perf_counter()
        problems = check_grid_builds(self.cfg)
        if problems:
            raise GridBuildError(
                f"grid {self.table}: {len(problems)} part(s) cannot be built, nothing was "
                "trained:\n  " + "\n  ".join(problems)
            )
        self.say(
            f"grid {self.table}: {len(self.rows)} rows, {len(self.pirates)} pirate architectures "
            f"and {len(self.cfg.get('surrogates') or [])} surrogates build "
            f"({time.perf_counter() - t0:.1f} s)"
        )

    def run(self, check: bool = True) -> dict:
        """Checks that everything builds (unless ``check`` is False: a worker whose parent
        checked), then runs (or resumes) every selected stage; with kept ``records``, only
        what they do not hold (:meth:`use_records`)."""
        if check:
            self.check_builds()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic_text(
            self.run_dir / "pipeline_config.yaml", yaml.safe_dump(self.cfg, sort_keys=False)
        )
        self.write_plan()
        t0 = time.perf_counter()
        lazy = self.use_records() if self.records else None
        self._stages(lazy)
        seconds = round(time.perf_counter() - t0, 1)
        self.say(
            f"grid {self.table}: finished in {seconds} s; tables: raeg table --runs {self.run_dir}"
        )
        return {"seconds": seconds}

    @contextlib.contextmanager
    def _dry_if(self, flag: bool):
        """Stages inside run dry (:class:`StageRunner`) when ``flag`` is set."""
        before = self.dry
        self.dry = before or flag
        try:
            yield
        finally:
            self.dry = before

    def _stages(self, lazy: dict | None = None) -> None:
        """Every selected stage in order (dry when :attr:`dry` is set); ``lazy`` (from
        :meth:`use_records`) skips the surrogates, the clean export and the method stages
        (with their protectors) that no stage still to run needs."""
        archs = self._selected(self.archs, self.only_archs)
        rows = self._selected(list(self.rows), self.only_rows)
        with self._dry_if(lazy is not None and not lazy["surrogates"]):
            surrogates = self.shared_surrogates()
        if lazy is None or lazy["pirates"]:
            self.clean_export()
        # The held-out clean-trained classifiers of the inference-time table come first: every
        # method stage evaluates its protected test images on them.
        for arch in self.heldout:
            self.pirate_stage(CLEAN, arch, "none", self.seed, "clean")
        reversible = {}
        for row in rows:
            with self._dry_if(lazy is not None and row in lazy["kept_rows"]):
                reversible[row] = self.method_stage(row, self.rows[row], surrogates).get(
                    "reversible"
                )
        # Seed-major, then defence and architecture, rows innermost: a grid stopped early
        # leaves whole columns of every table filled rather than whole rows.
        trained = [r for r in (CLEAN, *rows) if r in self.pirate_rows]
        for seed in self.seeds:
            for defense in self._selected(self.defenses, self.only_defenses):
                for arch in archs:
                    for row in trained:
                        source = "clean" if row == CLEAN else "protected"
                        self.pirate_stage(row, arch, defense, seed, source)
            for arch in archs if self.authorized else []:
                for row in trained:
                    if reversible.get(row) and arch in self.authorized_archs:
                        self.pirate_stage(row, arch, "none", seed, "recovered")

    def use_records(self) -> dict:
        """Resumes from kept records (``raeg table --keep-records``), as on a fresh machine.

        A dry pass computes every selected stage's recipe. A kept method or pirate stage
        whose recipe hash is the config's counts as done; a kept stage of another recipe is
        named and not used. Kept pirate stages are copied into the run directory (so they
        are skipped), and so are the method stages of rows whose every pirate is kept: those
        rows' protectors and method stages do not run. The held-out classifiers train again
        when a method stage runs (it needs their weights, which records do not hold). The
        surrogates run only when some row's method stage must, the clean export only when some pirate must train. A row
        that reruns its method stage (one of its pirates is not kept) refits its protector
        from the same recipe, so its new pirates and its kept ones come from two fits.

        Returns:
            ``{"kept_rows": rows wholly kept, "surrogates": bool, "pirates": bool,
            "stages": stage names still to run}``.
        """
        kept = read_kept(self.records)
        self.dry, self.visited = True, []
        self.dry_results = {
            name: json.loads((folder / RESULTS_FILE).read_text())
            for name, (folder, _) in kept.items()
            if name.startswith("methods/")
        }
        try:
            self._stages()
        finally:
            self.dry = False
        covered: set[str] = set()
        done_here: set[str] = set()
        todo: list[str] = []
        for name in dict.fromkeys(self.visited):
            if not name.startswith(("methods/", "pirates/")):
                continue
            if stage_done(self.run_dir / name):
                done_here.add(name)
            if name in done_here or (name in kept and kept[name][1] == self.recipes.get(name)):
                covered.add(name)
            else:
                if name in kept:
                    self.say(f"{name}: kept record not used (another recipe than the config's)")
                todo.append(name)
        rows = self._selected(list(self.rows), self.only_rows)
        kept_rows = {
            r
            for r in rows
            if f"methods/{r}" in covered and not any(n.startswith(f"pirates/{r}/") for n in todo)
        }
        # Records hold no weights: a method stage that runs again attacks the held-out
        # classifiers' checkpoints, so those train again too (else it would leave them out).
        # (A results file without weights here is a record copied by an earlier resume.)
        if any(r not in kept_rows for r in rows):
            for arch in self.heldout:
                folder = self.heldout_dir(arch)
                if not (folder / "checkpoints" / "last.ckpt").is_file():
                    name = str(folder.relative_to(self.run_dir))
                    covered.discard(name)
                    done_here.discard(name)
                    (folder / RESULTS_FILE).unlink(missing_ok=True)
                    todo += [] if name in todo else [name]
        for name in sorted(covered - done_here):
            if name.startswith("methods/") and name.split("/", 1)[1] not in kept_rows:
                continue
            dst = self.run_dir / name
            dst.mkdir(parents=True, exist_ok=True)
            folder = kept[name][0]
            # The recipe first: a folder with results.json counts as done.
            for file in (RECIPE_FILE, RESULTS_FILE):
                if (folder / file).is_file():
                    write_atomic_text(dst / file, (folder / file).read_text())
        # A row not wholly kept exports its data again (its pirates still to train need it).
        todo += [f"methods/{r}" for r in rows if r not in kept_rows and f"methods/{r}" not in todo]
        lazy = {
            "kept_rows": kept_rows,
            "surrogates": any(r not in kept_rows for r in rows),
            "pirates": any(n.startswith("pirates/") for n in todo),
            "stages": todo,
        }
        self.say(
            f"grid {self.table}: from the kept records, {len(todo)} method and pirate "
            f"stage(s) to run (with the surrogates and protectors they need); rows wholly "
            f"kept: {sorted(kept_rows) or 'none'}"
        )
        return lazy


def worker_jobs(grid: Grid) -> list[list[list[str]]]:
    """The ``raeg grid`` argument lists of a grid run by several worker processes, in phases.

    Jobs of one phase share no stage, so they run at once; a phase starts when the one
    before it has finished:

    1. the stages every later job reads: the surrogates, the clean export and the held-out
       classifiers;
    2. every row's method stage (and protector), one job per row (rows that share a
       protector in one job);
    3. the pirates, one job per (seed, defence, architecture) over every row, seed-major (a
       run stopped early leaves whole seeds), the costliest defences of a seed first; the
       authorised classifiers of a seed go with the jobs of its first defence only;
    4. the table's whole plan in ``grid.json`` (each job recorded only its own part).

    Each list holds the arguments after ``raeg grid --config FILE [overrides]``, its own
    overrides first (options take several values); the driver overrides (``seeds``,
    ``pirate_rows``) change no stage's recipe.
    """
    rows = grid._selected(list(grid.rows), grid.only_rows)
    archs = grid._selected(grid.archs, grid.only_archs)
    defenses = grid._selected(grid.defenses, grid.only_defenses)
    if not rows:
        raise ValueError(f"grid {grid.table}: no rows selected")
    no_pirates = "pirate_rows=[]"
    # Rows that share a protector (Grid.protector_owner) go in one job: the fit runs once.
    groups: dict[str, list[str]] = {}
    for r in rows:
        groups.setdefault(grid.protector_owner(r), []).append(r)
    phases = [
        [[no_pirates, "--shared-only"]],
        [[no_pirates, "--rows", *group] for group in groups.values()],
    ]

    def cost(defense: str) -> int:  # training-loop defences cost several plain pirates
        return 0 if parse_pirate_defense(defense).kind == "training" else 1

    pirates = []
    for seed in grid.seeds:
        for defense in sorted(defenses, key=cost):
            for arch in archs:
                job = [f"seeds=[{seed}]", "--rows", *rows, "--archs", arch, "--defenses", defense]
                if defense != defenses[0]:
                    job.append("--skip-authorized")
                pirates.append(job)
    phases.append(pirates)
    phases.append([["--plan"]])
    return [p for p in phases if p]


def run_workers(
    config: str, overrides: list[str], run_dir: str | None, grid: Grid, workers: int, say=print
) -> int:
    """Runs :func:`worker_jobs` with at most ``workers`` ``raeg grid`` processes at a time.

    Each job's output goes to ``<run_dir>/workers/<n>.log``. A failed job stops the run
    after its phase (later phases need its stages); its log is named.

    Returns:
        0 when every job succeeded, else 1.
    """
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    logs = grid.run_dir / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "raeg_pl.cli", "grid", "--worker", "--config", config]
    if run_dir:
        base += ["--run_dir", run_dir]

    def run(number: int, job: list[str]) -> tuple[int, Path, list[str]]:
        log = logs / f"{number:04d}.log"
        with open(log, "w") as fh:
            rc = subprocess.run(
                [*base, *overrides, *job], stdout=fh, stderr=subprocess.STDOUT
            ).returncode
        return rc, log, job

    t0 = time.perf_counter()
    first = 0  # the number of a phase's first job (its log's name)
    for i, phase in enumerate(worker_jobs(grid), 1):
        say(f"grid {grid.table}: phase {i}: {len(phase)} job(s), {workers} at a time")
        numbers = range(first, first + len(phase))
        first += len(phase)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            failed = [(log, job) for rc, log, job in pool.map(run, numbers, phase) if rc != 0]
        for log, job in failed:
            say(f"grid {grid.table}: job {' '.join(job)} failed; see {log}")
        if failed:
            return 1
    say(f"grid {grid.table}: workers finished in {time.perf_counter() - t0:.0f} s")
    return 0


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
    ap.add_argument(
        "--records",
        nargs="+",
        default=None,
        help="kept records (raeg table --keep-records DIR, e.g. docs/tables/<name>/records) to "
        "resume from on a machine without the earlier runs: stages they hold with the "
        "config's recipe are not run again, nor the protectors only those stages need",
    )
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. seeds=[0,1,2]")
    ap.add_argument(
        "--check",
        action="store_true",
        help="only validate the config, build every row's protector and method and every "
        "pirate on a tiny input, and exit",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=0,
        help="run the grid as this many concurrent raeg grid processes (one machine, e.g. "
        "small pirates sharing one GPU); see worker_jobs",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument(
        "--shared-only",
        action="store_true",
        help="only the stages every row shares: surrogates, clean export, held-out classifiers",
    )
    ap.add_argument(
        "--skip-authorized",
        action="store_true",
        help="do not train the authorised classifiers on recovered files",
    )
    ap.add_argument(
        "--plan",
        action="store_true",
        help="only record this table's plan in the folder's grid.json (what raeg table counts "
        "as planned) and exit; e.g. after jobs that ran parts of it with overrides",
    )
    ns = ap.parse_args(args)
    # `--defenses none gray seeds=[0]`: the options take several values, so overrides after
    # them land in their lists. An override (`key.path=value`) has no ':' before its '=',
    # unlike a defence spec (`jpeg:q=10`), and names of rows and archs have no '='.
    for key in ("rows", "archs", "defenses", "records"):
        values = getattr(ns, key)
        if values:
            setattr(ns, key, [v for v in values if not OVERRIDE_RE.match(v)])
            ns.overrides += [v for v in values if OVERRIDE_RE.match(v)]
    cfg = load_grid_config(ns.config, ns.overrides)
    grid = Grid(
        cfg,
        ns.run_dir,
        rows=[] if ns.shared_only else ns.rows,
        archs=ns.archs,
        defenses=ns.defenses,
        authorized=not ns.skip_authorized,
        records=ns.records,
    )
    problems = validate_grid_config(cfg)
    if problems:
        print(f"raeg grid: {ns.config}:\n  " + "\n  ".join(problems), flush=True)
        return 2

    def builds() -> bool:
        """The build check, its failure printed."""
        try:
            grid.check_builds()
        except GridBuildError as e:
            print(f"raeg grid: {ns.config}: {e}", file=sys.stderr, flush=True)
            return False
        return True

    if ns.check:
        if not builds():
            return 2
        print(f"raeg grid: {ns.config}: valid ({len(grid.plan()['rows'])} rows)", flush=True)
        return 0
    if ns.plan:
        grid.run_dir.mkdir(parents=True, exist_ok=True)
        grid.write_plan()
        print(f"raeg grid: plan of table {grid.table!r} written to {grid.run_dir / 'grid.json'}")
        return 0
    if ns.workers and grid.records:
        # The kept stages are copied in here; the workers run the rest, only the rows that
        # still need their method stage taking part (none left: this process runs the rest).
        grid.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            lazy = grid.use_records()
        except (StageRecipeError, TableError) as e:
            print(f"raeg grid: {e}", file=sys.stderr, flush=True)
            return 2
        if not lazy["stages"]:
            print(f"raeg grid: {ns.config}: every stage is kept or done", flush=True)
            return 0
        rows = grid._selected(list(grid.rows), grid.only_rows)
        left = [r for r in rows if r not in lazy["kept_rows"]]
        if left:
            grid.only_rows = left
        else:
            ns.workers = 0
    if ns.workers:
        if not builds():
            return 2
        rc = run_workers(ns.config, ns.overrides, ns.run_dir, grid, ns.workers)
    else:
        try:
            grid.run(check=not ns.worker)
        except GridBuildError as e:
            print(f"raeg grid: {ns.config}: {e}", file=sys.stderr, flush=True)
            return 2
        except (StageRecipeError, TableError) as e:
            print(f"raeg grid: {e}", file=sys.stderr, flush=True)
            return 2
        rc = 0
    if rc or not ns.tables:
        return rc
    from raeg_pl.tables import main as table_main

    return table_main(["--runs", str(grid.run_dir), "--out", ns.tables])


__all__ = [
    "CLEAN",
    "GRID_KEYS",
    "Grid",
    "GridBuildError",
    "load_grid_config",
    "main",
    "parse_adv_train",
    "run_workers",
    "validate_grid_config",
    "worker_jobs",
]
