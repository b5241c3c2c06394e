"""The end-to-end protection experiment: surrogate -> protector -> export -> pirates / authorised.

``raeg pipeline --config experiments/protect/quick.yaml`` runs, each stage in its own folder
under the run directory, skipping stages whose ``results.json`` exists (an interrupted run
resumes; a classifier or protector interrupted mid-training resumes from its last checkpoint):

1. ``surrogate_<i>``  classifiers trained on the owner's clean training split;
2. ``protector``      the RAEG generator trained against the frozen surrogates;
3. ``export``         clean, protected and recovered copies of the training split as 8-bit
                      PNG folders with manifests; fidelity and reversibility measured from the
                      stored files; surrogate accuracy on protected held-out test images;
4. ``pirate_<d>``     the pirate recipe trained on protected data after pirate defence ``d``;
5. ``authorized``     the same recipe on the recovered data;
6. ``clean_<d>``      the same recipe on the clean copy (after defence ``d``): the baseline.

Every classifier is evaluated on the clean test split. The run directory gets
``results.json`` (all figures and split sizes), ``report.md`` (table, image grid, plots) and
``owner.raegkey``, the protector's standalone key file for ``raeg protect`` / ``raeg
restore`` (rewritten only when the protector changed; an encoder-decoder protector has none,
with the reason logged and recorded as ``key_skipped``).

The stages themselves live in :mod:`raeg_pl.stages`, shared with ``raeg grid``; this module
orders them.

Each stage folder also records its **recipe** (``recipe.json``): the config sections that
determine its output plus the recipe hashes of the stages it builds on. A finished or
half-finished stage whose recipe differs from the current config's is never reused or
resumed: the run stops with an error naming the folder and the differing keys, so a changed
config can never silently mix old and new results in one run directory.
"""

from __future__ import annotations

import sys
import time

import yaml

from raeg_pl.config import PIPELINE_KEYS, deep_merge, load_pipeline_config
from raeg_pl.stages.classifiers import run_classifiers
from raeg_pl.stages.common import (
    StageLimitReached,
    StageRecipeError,
    StageRunner,
    read_stage,
    single_process_from_here,
    train_classifier,
)
from raeg_pl.stages.export import export_stage, method_export_stage, run_export
from raeg_pl.stages.protector import run_protector, write_owner_key
from raeg_pl.stages.report import summarise, write_report
from raeg_pl.stages.surrogate import run_surrogates
from raeg_pl.utils.files import write_atomic_text
from raeg_pl.utils.run import write_results
from raeg_pl.utils.trainer import end_wandb_run, flatten_config, log_final_metrics, run_loggers


class Pipeline(StageRunner):
    """Runs the stages of one protection experiment in ``run_dir`` (see module docstring).

    Args:
        cfg: the pipeline config (:func:`raeg_pl.config.load_pipeline_config`).
        run_dir: the run directory (default: the config's ``run_dir``).
        stop_after: stop after the stage of this name (used to test resuming).
    """

    def surrogates(self):
        """Stage 1 (:func:`raeg_pl.stages.surrogate.run_surrogates`)."""
        return run_surrogates(self)

    def protector(self, surrogate_ckpts, name: str = "protector", spec: dict | None = None):
        """Stage 2 (:func:`raeg_pl.stages.protector.run_protector`)."""
        return run_protector(self, surrogate_ckpts, name=name, spec=spec)

    def export(self, protector_ckpt, surrogate_ckpts) -> dict:
        """Stage 3 (:func:`raeg_pl.stages.export.run_export`)."""
        return run_export(self, protector_ckpt, surrogate_ckpts)

    def classifiers(self) -> dict[str, dict]:
        """Stages 4-6 (:func:`raeg_pl.stages.classifiers.run_classifiers`)."""
        return run_classifiers(self)

    def owner_key(self, protector_ckpt) -> dict:
        """The run's key file (:func:`raeg_pl.stages.protector.write_owner_key`)."""
        from raeg_pl.data.datamodule import ImageClassificationDataModule

        data = deep_merge(self.data_cfg, self.cfg["protector"].get("data") or {})
        classes = ImageClassificationDataModule(**data).classes
        return write_owner_key(
            self.run_dir,
            protector_ckpt,
            read_stage(protector_ckpt.parent.parent),
            classes,
            say=self.say,
        )

    def run(self) -> dict:
        """Runs (or resumes) every stage; returns the experiment's summary."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic_text(
            self.run_dir / "pipeline_config.yaml", yaml.safe_dump(self.cfg, sort_keys=False)
        )
        t0 = time.perf_counter()
        sur = self.surrogates()
        prot = self.protector(sur)
        exp = self.export(prot, sur)
        if not single_process_from_here():
            return {}
        clfs = self.classifiers()
        # After the classifiers: a key that cannot be written stops the run without costing
        # them, and the rerun that follows finds every stage done.
        key = self.owner_key(prot)
        results = summarise(self.cfg, self.run_dir, exp, clfs)
        results.update(key)
        results["pipeline_seconds_this_invocation"] = round(time.perf_counter() - t0, 1)
        write_results(self.run_dir, results, yaml.safe_dump(self.cfg, sort_keys=True))
        write_report(self.run_dir, results)
        summary = self.stage_wandb("summary", self.seed)
        if summary:
            loggers = run_loggers(self.run_dir, summary, config=flatten_config(self.cfg))
            log_final_metrics(loggers, results)
            end_wandb_run(loggers)
        self.say(f"results: {self.run_dir / 'results.json'}, report: {self.run_dir / 'report.md'}")
        return results


def main(args: list[str]) -> int:
    """``raeg pipeline --config FILE [--run_dir DIR] [key.path=value ...]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="raeg pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="pipeline YAML (experiments/protect/*.yaml)")
    ap.add_argument("--run_dir", default=None, help="run directory (default: the config's)")
    ap.add_argument("--stop_after", default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. protector.max_epochs=2")
    # Overrides may stand on both sides of an option (`seed=0 --run_dir D lr=0.1`).
    ns = ap.parse_intermixed_args(args)
    cfg = load_pipeline_config(ns.config, ns.overrides)
    try:
        Pipeline(cfg, ns.run_dir, stop_after=ns.stop_after).run()
    except StageLimitReached as stop:
        print(f"[raeg pipeline] stopped after stage {stop}", flush=True)
        return 3
    except StageRecipeError as e:
        print(f"raeg pipeline: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


__all__ = [
    "PIPELINE_KEYS",
    "Pipeline",
    "StageLimitReached",
    "StageRecipeError",
    "deep_merge",
    "export_stage",
    "load_pipeline_config",
    "main",
    "method_export_stage",
    "summarise",
    "train_classifier",
    "write_report",
]
