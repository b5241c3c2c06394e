"""Stage folders, done-markers, recipe checks, the Trainer factory and classifier training.

A stage folder is done when it holds ``results.json``. It also records its **recipe**
(``recipe.json``): the config sections that determine its output plus the recipe hashes of
the stages it builds on. A finished or half-finished stage whose recipe differs from the
current config's is never reused or resumed: :class:`StageRunner` stops with an error
naming the folder and the differing keys.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L

from raeg_pl.config import deep_merge, normalise_recipe, recipe_differences
from raeg_pl.data.datamodule import ImageClassificationDataModule
from raeg_pl.utils.files import RECIPE_FILE, RESULTS_FILE, write_atomic_text
from raeg_pl.utils.run import config_hash, process_rank, to_float_dict, write_results
from raeg_pl.utils.trainer import (
    effective_precision,
    end_wandb_run,
    log_final_metrics,
    run_callbacks,
    run_loggers,
    wandb_settings,
)


# ------------------------------------------------------------------ folders
def stage_done(stage_dir: Path) -> bool:
    """Whether the stage folder holds its results (the stage finished)."""
    return (Path(stage_dir) / RESULTS_FILE).is_file()


def read_stage(stage_dir: Path) -> dict:
    """The results of a finished stage."""
    return json.loads((Path(stage_dir) / RESULTS_FILE).read_text())


def stage_of(checkpoint: Path) -> str:
    """The stage name of ``<run_dir>/<stage>/checkpoints/last.ckpt``."""
    return Path(checkpoint).parent.parent.name


def resume_checkpoint(stage_dir: Path) -> str | None:
    """The stage's last checkpoint, which an interrupted fit resumes from; None if none."""
    last = Path(stage_dir) / "checkpoints" / "last.ckpt"
    return str(last) if last.is_file() else None


def slug(defense: str) -> str:
    """A defence spec as a folder name (``jpeg:q=75`` -> ``jpeg_q75``; identity -> ``none``)."""
    return (
        "none"
        if defense in ("none", "identity")
        else defense.replace(":", "_").replace("=", "").replace(",", "_").replace(".", "p")
    )


def recipe_hash(recipe: Any) -> str:
    """The hash of a normalised recipe (the run records' :func:`config_hash` of its JSON)."""
    return config_hash(json.dumps(recipe, sort_keys=True))


class StageRecipeError(RuntimeError):
    """A stage folder holds the output of another recipe than the current config's."""


class StageLimitReached(Exception):
    """Raised after the stage named by ``stop_after`` (used to test resuming)."""


def single_process_from_here() -> bool:
    """Ends DDP after the stages that use it; False on the extra ranks, which then stop.

    With a DDP protector preset, Lightning starts the extra ranks by running the same
    command again; they join the protector fit and the sharded export, and the classifier
    stages that follow run once, on rank 0.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    return rank == 0


# ------------------------------------------------------------------ training
#: Trainer arguments every stage sets itself; a config's ``trainer`` section must not.
STAGE_OWNED_TRAINER_ARGS = ("max_epochs", "default_root_dir", "callbacks", "logger")


def make_trainer(
    stage_dir: Path,
    trainer_cfg: dict,
    max_epochs: int,
    wandb: dict | None,
    monitor: str | None,
    mode: str = "max",
    **extra: Any,
) -> tuple[L.Trainer, Any]:
    """A stage's Trainer and its metric history: logs, checkpoints and callbacks in the folder.

    Args:
        stage_dir: the stage folder (``default_root_dir``).
        trainer_cfg: Trainer arguments of the config's ``trainer`` section (merged with the
            stage's own); they override the defaults here.
        max_epochs: epochs of the fit.
        wandb: wandb settings of the stage (None: CSV only).
        monitor: metric the best checkpoint is chosen on (None: last only).
        mode: ``"max"`` or ``"min"`` for ``monitor``.
        **extra: more Trainer arguments (they override ``trainer_cfg``).
    """
    owned = sorted(set(trainer_cfg) & set(STAGE_OWNED_TRAINER_ARGS))
    if owned:
        raise ValueError(
            f"{stage_dir}: trainer.{owned[0]} is set by each stage, not by the trainer "
            "section: give each stage its own (e.g. protector.max_epochs=N, "
            "pirate.max_epochs=N, surrogates.<i>.max_epochs) or cap every fit with "
            "trainer.max_steps / trainer.limit_train_batches"
        )
    callbacks, history = run_callbacks(stage_dir, monitor=monitor, mode=mode)
    args = {"num_sanity_val_steps": 0, "log_every_n_steps": 20, **trainer_cfg, **extra}
    if "precision" in args:
        args["precision"] = effective_precision(args["precision"], args.get("accelerator"))
    trainer = L.Trainer(
        default_root_dir=str(stage_dir),
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=run_loggers(stage_dir, wandb),
        enable_model_summary=False,
        **args,
    )
    return trainer, history


def train_classifier(
    stage_dir: Path,
    model_cfg: dict,
    data_cfg: dict,
    trainer_cfg: dict,
    max_epochs: int,
    seed: int,
    wandb: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """Trains one classifier (resuming from its last checkpoint) and records its results.

    The data module validates on its own held-out split and on the clean test split after
    every epoch, so results hold the final and the peak clean-test accuracy.

    Args:
        stage_dir: the stage folder (checkpoints, logs, ``results.json``).
        model_cfg: :class:`~raeg_pl.lit.classifier.ClassifierLitModule` arguments (classes
            and channels come from the data).
        data_cfg: :class:`~raeg_pl.data.datamodule.ImageClassificationDataModule` arguments.
        trainer_cfg: Trainer arguments.
        max_epochs: epochs of the fit.
        seed: global seed of the fit.
        wandb: wandb settings (None: CSV only).
        extra: more result fields.

    Returns:
        The results written to ``results.json``.
    """
    from raeg_pl.lit.classifier import ClassifierLitModule

    L.seed_everything(seed, workers=True)
    dm = ImageClassificationDataModule(**{**data_cfg, "val_on_test": True})
    model = ClassifierLitModule(
        **{**model_cfg, "num_classes": dm.num_classes, "in_chans": dm.channels}
    )
    # No best-epoch checkpoint: the results keep the whole clean-test curve, and nothing
    # reloads a classifier but from its last epoch (one checkpoint per pirate on disk).
    trainer, history = make_trainer(stage_dir, trainer_cfg, max_epochs, wandb, monitor=None)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm, ckpt_path=resume_checkpoint(stage_dir))
    fit_s = time.perf_counter() - t0
    fit_metrics = to_float_dict(trainer.callback_metrics)
    trainer.test(model, datamodule=dm, verbose=False)
    test_metrics = to_float_dict(trainer.callback_metrics)
    log_final_metrics(trainer.loggers, {"test_acc": test_metrics["test/acc"]})
    end_wandb_run(trainer.loggers)
    curve = [row["val/test_acc"] for row in history.history if "val/test_acc" in row]
    results = {
        "test_acc": test_metrics["test/acc"],
        "test_acc_peak": max(curve) if curve else test_metrics["test/acc"],
        "test_acc_curve": curve,
        "val_acc": fit_metrics.get("val/acc"),
        "history": history.history,
        "splits": dm.split_sizes,
        "fit_seconds": round(fit_s, 1),
        "precision": str(trainer.precision),
        "model": model_cfg,
        "data": data_cfg,
        "max_epochs": max_epochs,
        "seed": seed,
        **({"defense_stats": dm.train_defense_stats} if dm.train_defense_stats else {}),
        **(extra or {}),
    }
    write_results(
        stage_dir, results, json.dumps([model_cfg, data_cfg, trainer_cfg], sort_keys=True)
    )
    return results


# ------------------------------------------------------------------ the runner
class StageRunner:
    """Runs stages in the folders of one run directory, checking and recording recipes.

    Args:
        cfg: the pipeline (or grid) config.
        run_dir: the run directory (default: the config's ``run_dir``).
        stop_after: stop (:class:`StageLimitReached`) after the stage of this name.

    Attributes:
        recipes: stage name -> recipe hash, for the stages met in this invocation; later
            stages record the hashes of the stages they build on.
        log: the lines printed so far.
    """

    prefix = "[raeg pipeline]"

    def __init__(
        self, cfg: dict, run_dir: str | os.PathLike | None = None, stop_after: str | None = None
    ) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir or cfg.get("run_dir") or "runs/pipeline")
        self.seed = int(cfg.get("seed", 0))
        self.trainer_cfg = dict(cfg.get("trainer") or {})
        self.data_cfg = dict(cfg.get("data") or {})
        self.wandb = cfg.get("wandb")
        self.stop_after = stop_after
        self.log: list[str] = []
        self.recipes: dict[str, str] = {}
        # A dry pass (:meth:`run_stage` with ``dry`` set) runs no stage: it records each
        # stage's recipe hash and name (``visited``) and returns what the stage holds, else
        # ``dry_results[name]`` (a kept record's results), else {}.
        self.dry = False
        self.visited: list[str] = []
        self.dry_results: dict[str, dict] = {}

    def say(self, msg: str) -> None:
        """Prints one progress line (and keeps it in :attr:`log`)."""
        line = f"{self.prefix} {msg}"
        print(line, flush=True)
        self.log.append(line)

    def stage_wandb(self, stage: str, seed: int | None = None) -> dict | None:
        """wandb settings of one stage: grouped by run directory, named by stage and seed."""
        return wandb_settings(
            self.wandb,
            table=self.run_dir.name,
            row=self.run_dir.name,
            seed=seed,
            stage=stage,
            profile=self.cfg.get("profile"),
        )

    def check_recipe(self, name: str, stage_dir: Path, recipe: dict) -> dict:
        """Records the stage's recipe hash; refuses a folder holding another recipe's work.

        A folder written before recipes were recorded is checked on what its results kept
        (the ``model`` section), which catches a changed architecture or loss setting.

        Returns:
            The normalised recipe.

        Raises:
            StageRecipeError: the folder holds another recipe's work (message names the
                folder and the differing keys).
        """
        rec = normalise_recipe(recipe)
        digest = recipe_hash(rec)
        self.recipes[name] = digest
        path = stage_dir / RECIPE_FILE
        diff: list[str] = []
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise StageRecipeError(f"{path}: unreadable recipe record ({e})") from e
            if old.get("hash") != digest:
                diff = recipe_differences(old.get("recipe"), rec) or ["(recipe format)"]
        elif stage_done(stage_dir):
            kept = read_stage(stage_dir).get("model")
            spec_model = (rec.get("spec") or {}).get("model")
            if kept is not None and spec_model is not None:
                diff = [
                    f"spec.model.{k}"
                    for k in recipe_differences(normalise_recipe(kept), spec_model)
                ]
        if diff:
            shown = ", ".join(
                d.replace("upstream", "upstream (a stage it builds on)") for d in diff[:8]
            )
            more = f" and {len(diff) - 8} more" if len(diff) > 8 else ""
            raise StageRecipeError(
                f"{stage_dir}: this stage was run with another recipe than the current config's "
                f"(differs in: {shown}{more}). Delete the folder to recompute it, or use another "
                "run directory."
            )
        return rec

    def run_stage(self, name: str, fn: Callable[[Path], dict], recipe: dict | None = None) -> dict:
        """Runs ``fn(stage_dir)`` in ``<run_dir>/<name>`` unless done; returns its results.

        Raises:
            StageRecipeError: see :meth:`check_recipe`.
            StageLimitReached: after the stage named by ``stop_after``.
        """
        stage_dir = self.run_dir / name
        rec = None if recipe is None else self.check_recipe(name, stage_dir, recipe)
        if self.dry:
            self.visited.append(name)
            return (
                read_stage(stage_dir) if stage_done(stage_dir) else self.dry_results.get(name, {})
            )
        if stage_done(stage_dir):
            self.say(f"{name}: done before, skipped")
            return read_stage(stage_dir)
        self.say(f"{name}: running")
        if rec is not None and process_rank() == 0:
            stage_dir.mkdir(parents=True, exist_ok=True)
            record = {"hash": self.recipes[name], "recipe": rec}
            write_atomic_text(stage_dir / RECIPE_FILE, json.dumps(record, indent=2, sort_keys=True))
        t0 = time.perf_counter()
        out = fn(stage_dir)
        self.say(f"{name}: finished in {time.perf_counter() - t0:.0f} s")
        if self.stop_after == name:
            raise StageLimitReached(name)
        return out

    def train(
        self,
        stage_dir: Path,
        spec: dict,
        seed: int,
        data: dict | None = None,
        extra: dict | None = None,
        wandb: dict | None = None,
    ) -> dict:
        """One classifier stage from a ``{model, max_epochs, data?, trainer?}`` spec."""
        data_cfg = deep_merge(deep_merge(self.data_cfg, spec.get("data") or {}), data or {})
        trainer_cfg = deep_merge(self.trainer_cfg, spec.get("trainer") or {})
        return train_classifier(
            stage_dir,
            spec["model"],
            data_cfg,
            trainer_cfg,
            int(spec["max_epochs"]),
            seed,
            wandb if wandb is not None else self.stage_wandb(stage_dir.name, seed),
            extra=extra,
        )

    def config_data_seed(self, spec: dict) -> int:
        """The data module seed a classifier stage of ``spec`` gets from the config: the
        ``data`` section's (or the spec's) ``seed``, else the data module's default, 0."""
        return int(deep_merge(self.data_cfg, spec.get("data") or {}).get("seed", 0))

    def classifier_recipe(
        self,
        spec: dict,
        seed: int,
        source: str = "clean",
        defense: str = "none",
        upstream: str | None = None,
        data_seed: int | None = None,
    ) -> dict:
        """The recipe of a classifier stage: its spec, data, trainer and seed, the data
        source and pirate defence, and the recipe hash of the stage that made its data.

        ``data_seed`` is the stage's data module seed (train/validation split, on-device
        training order) when the stage sets its own. The recipe's ``data`` section then
        holds it, unless it equals the config's (:meth:`config_data_seed`): a stage that
        splits and orders its data as the config does keeps the recipe it always had.
        """
        data = self.data_cfg
        if data_seed is not None and data_seed != self.config_data_seed(spec):
            data = {**data, "seed": data_seed}
        return {
            "stage": "classifier",
            "spec": spec,
            "data": data,
            "trainer": self.trainer_cfg,
            "seed": seed,
            "source": source,
            "defense": defense,
            "upstream": upstream,
        }


__all__ = [
    "StageLimitReached",
    "StageRecipeError",
    "StageRunner",
    "make_trainer",
    "read_stage",
    "recipe_hash",
    "resume_checkpoint",
    "single_process_from_here",
    "slug",
    "stage_done",
    "stage_of",
    "train_classifier",
]
