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
``results.json`` (all figures and split sizes) and ``report.md`` (table, image grid, plots).

Each stage folder also records its **recipe** (``recipe.json``): the config sections that
determine its output plus the recipe hashes of the stages it builds on. A finished or
half-finished stage whose recipe differs from the current config's is never reused or
resumed: the run stops with an error naming the folder and the differing keys, so a changed
config can never silently mix old and new results in one run directory.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from raeg_pl.data.datamodule import ImageClassificationDataModule, apply_defense_uint8
from raeg_pl.utils.files import write_atomic_text
from raeg_pl.utils.run import config_hash, process_rank, to_float_dict, write_results
from raeg_pl.utils.trainer import (
    end_wandb_run,
    flatten_config,
    log_final_metrics,
    run_callbacks,
    run_loggers,
    wandb_settings,
)

STAGE_RESULTS = "results.json"
STAGE_RECIPE = "recipe.json"
# Keys that locate files or only change what is printed: not part of any stage's recipe.
_NOT_RECIPE = frozenset({"data_dir", "cache_dir", "num_workers", "enable_progress_bar"})


# ------------------------------------------------------------------------ configuration
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


def load_pipeline_config(
    path: str | os.PathLike, overrides: list[str] | None = None, keys: tuple[str, ...] | None = None
) -> dict:
    """A pipeline config with its ``defaults:`` chain merged, then ``a.b.c=value`` overrides."""
    from raeg_pl.cli import _load_with_defaults

    cfg: dict = {}
    for text in _load_with_defaults(Path(path)):
        cfg = deep_merge(cfg, yaml.safe_load(text) or {})
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key.path=value")
        key, value = item.split("=", 1)
        node: Any = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        last = parts[-1]
        parsed = _parse_override(value)
        if isinstance(node, list):
            node[int(last)] = parsed
        else:
            node[last] = parsed
    keys = keys or PIPELINE_KEYS
    unknown = set(cfg) - set(keys)
    if unknown:
        raise ValueError(f"{path}: unknown config keys {sorted(unknown)}; valid: {keys}")
    return cfg


def _parse_override(value: str) -> Any:
    """A YAML value; numbers YAML 1.1 reads as text (``5e-05``, as sweep agents write) too."""
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str):
        try:
            return float(parsed)
        except ValueError:
            return parsed
    return parsed


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
    "wandb",
    "profile",
    "description",
)


# ------------------------------------------------------------------------------ helpers
def _stage_done(stage_dir: Path) -> bool:
    return (stage_dir / STAGE_RESULTS).is_file()


def _read(stage_dir: Path) -> dict:
    return json.loads((stage_dir / STAGE_RESULTS).read_text())


class StageRecipeError(RuntimeError):
    """A stage folder holds the output of another recipe than the current config's."""


def normalise_recipe(recipe: Any) -> Any:
    """``recipe`` as plain JSON values, without the keys of :data:`_NOT_RECIPE`."""
    if isinstance(recipe, dict):
        return {str(k): normalise_recipe(v) for k, v in recipe.items() if k not in _NOT_RECIPE}
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


def _trainer(
    stage_dir: Path,
    trainer_cfg: dict,
    max_epochs: int,
    wandb: dict | None,
    monitor: str | None,
    mode: str = "max",
    **extra,
) -> tuple[L.Trainer, Any]:
    callbacks, history = run_callbacks(stage_dir, monitor=monitor, mode=mode)
    trainer = L.Trainer(
        default_root_dir=str(stage_dir),
        max_epochs=max_epochs,
        callbacks=callbacks,
        logger=run_loggers(stage_dir, wandb),
        enable_model_summary=False,
        **{"num_sanity_val_steps": 0, "log_every_n_steps": 20, **trainer_cfg, **extra},
    )
    return trainer, history


def _resume_ckpt(stage_dir: Path) -> str | None:
    last = stage_dir / "checkpoints" / "last.ckpt"
    return str(last) if last.is_file() else None


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
    """
    from raeg_pl.lit.classifier import ClassifierLitModule

    L.seed_everything(seed, workers=True)
    dm = ImageClassificationDataModule(**{**data_cfg, "val_on_test": True})
    model = ClassifierLitModule(
        **{**model_cfg, "num_classes": dm.num_classes, "in_chans": dm.channels}
    )
    trainer, history = _trainer(stage_dir, trainer_cfg, max_epochs, wandb, monitor="val/acc")
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm, ckpt_path=_resume_ckpt(stage_dir))
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
        "model": model_cfg,
        "data": data_cfg,
        "max_epochs": max_epochs,
        "seed": seed,
        **(extra or {}),
    }
    write_results(
        stage_dir, results, json.dumps([model_cfg, data_cfg, trainer_cfg], sort_keys=True)
    )
    return results


# ------------------------------------------------------------------------------- stages
class Pipeline:
    """Runs the stages of one protection experiment in ``run_dir`` (see module docstring)."""

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
        self.recipes: dict[str, str] = {}  # stage name -> recipe hash, this invocation

    def _say(self, msg: str) -> None:
        line = f"[raeg pipeline] {msg}"
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

    def _check_recipe(self, name: str, stage_dir: Path, recipe: dict) -> dict:
        """Records the stage's recipe hash; refuses a folder holding another recipe's work.

        A folder written before recipes were recorded is checked on what its results kept
        (the ``model`` section), which catches a changed architecture or loss setting.
        """
        rec = normalise_recipe(recipe)
        digest = config_hash(json.dumps(rec, sort_keys=True))
        self.recipes[name] = digest
        path = stage_dir / STAGE_RECIPE
        diff: list[str] = []
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                raise StageRecipeError(f"{path}: unreadable recipe record ({e})") from e
            if old.get("hash") != digest:
                diff = recipe_differences(old.get("recipe"), rec) or ["(recipe format)"]
        elif _stage_done(stage_dir):
            kept = _read(stage_dir).get("model")
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

    def _stage(self, name: str, fn, recipe: dict | None = None) -> dict:
        stage_dir = self.run_dir / name
        rec = None if recipe is None else self._check_recipe(name, stage_dir, recipe)
        if _stage_done(stage_dir):
            self._say(f"{name}: done before, skipped")
            return _read(stage_dir)
        self._say(f"{name}: running")
        if rec is not None and process_rank() == 0:
            stage_dir.mkdir(parents=True, exist_ok=True)
            record = {"hash": self.recipes[name], "recipe": rec}
            write_atomic_text(
                stage_dir / STAGE_RECIPE, json.dumps(record, indent=2, sort_keys=True)
            )
        t0 = time.perf_counter()
        out = fn(stage_dir)
        self._say(f"{name}: finished in {time.perf_counter() - t0:.0f} s")
        if self.stop_after == name:
            raise StageLimitReached(name)
        return out

    def _train(
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

    # 1. surrogates
    def surrogates(self) -> list[Path]:
        paths = []
        for i, spec in enumerate(self.cfg["surrogates"]):
            name = f"surrogate_{i}"

            def run(stage_dir, spec=spec, i=i):
                return self._train(stage_dir, spec, self.seed + i)

            self._stage(name, run, self.classifier_recipe(spec, self.seed + i))
            paths.append(self.run_dir / name / "checkpoints" / "last.ckpt")
        return paths

    # 2. protector
    def protector(
        self, surrogate_ckpts: list[Path], name: str = "protector", spec: dict | None = None
    ) -> Path:
        from raeg_pl.lit.protector import ProtectorLitModule

        spec = spec or self.cfg["protector"]

        def run(stage_dir):
            L.seed_everything(self.seed, workers=True)
            data = deep_merge(self.data_cfg, spec.get("data") or {})
            dm = ImageClassificationDataModule(**data)
            model = ProtectorLitModule(
                surrogate_checkpoints=[str(p) for p in surrogate_ckpts],
                in_channels=dm.channels,
                **spec["model"],
            )
            trainer, history = _trainer(
                stage_dir,
                deep_merge(self.trainer_cfg, spec.get("trainer") or {}),
                int(spec["max_epochs"]),
                self.stage_wandb(name, self.seed),
                monitor=None,
                gradient_clip_val=spec.get("gradient_clip_val", 1.0),
            )
            t0 = time.perf_counter()
            trainer.fit(model, datamodule=dm, ckpt_path=_resume_ckpt(stage_dir))
            fit_s = time.perf_counter() - t0
            metrics = to_float_dict(trainer.callback_metrics)
            end_wandb_run(trainer.loggers)
            results = {
                "metrics": metrics,
                "history": history.history,
                "splits": dm.split_sizes,
                "fit_seconds": round(fit_s, 1),
                "recoveries": model.recoveries,
                "protector_fingerprint": model.protector.fingerprint(),
                "protector_config": model.protector.config,
                "model": spec["model"],
            }
            write_results(stage_dir, results, json.dumps(spec, sort_keys=True))
            return results

        recipe = {
            "stage": "protector",
            "spec": spec,
            "data": self.data_cfg,
            "trainer": self.trainer_cfg,
            "seed": self.seed,
            "upstream": [self.recipes.get(_stage_of(p)) for p in surrogate_ckpts],
        }
        self._stage(name, run, recipe)
        return self.run_dir / name / "checkpoints" / "last.ckpt"

    # 3. export + measurements from the stored files
    def export(self, protector_ckpt: Path, surrogate_ckpts: list[Path]) -> dict:
        def run(stage_dir):
            return export_stage(
                stage_dir,
                protector_ckpt,
                surrogate_ckpts[0],
                self.data_cfg,
                list(self.cfg.get("eval_defenses") or ["none", "jpeg:q=75", "gray"]),
                self.run_dir,
            )

        recipe = {
            "stage": "export",
            "data": self.data_cfg,
            "eval_defenses": list(self.cfg.get("eval_defenses") or ["none", "jpeg:q=75", "gray"]),
            "upstream": [
                self.recipes.get(_stage_of(p)) for p in (protector_ckpt, surrogate_ckpts[0])
            ],
        }
        return self._stage("export", run, recipe)

    # 4-6. pirates, authorised, clean
    def classifiers(self) -> dict[str, dict]:
        spec = self.cfg["pirate"]
        out = {}
        defenses = list(self.cfg.get("pirate_defenses") or ["none"])
        jobs = [(f"pirate_{_slug(d)}", "protected", d) for d in defenses]
        jobs.append(("authorized", "recovered", "none"))
        jobs += [(f"clean_{_slug(d)}", "clean", d) for d in defenses]
        for name, source, defense in jobs:

            def run(stage_dir, source=source, defense=defense):
                data = {
                    "train_dir": str(self.run_dir / "export" / source / "train"),
                    "train_defense": None if defense == "none" else defense,
                    "train_per_class": None,
                }
                return self._train(
                    stage_dir,
                    spec,
                    self.seed + 100,
                    data,
                    extra={"source": source, "defense": defense},
                )

            upstream = None if source == "clean" else self.recipes.get("export")
            recipe = self.classifier_recipe(spec, self.seed + 100, source, defense, upstream)
            out[name] = self._stage(name, run, recipe)
        return out

    def classifier_recipe(
        self,
        spec: dict,
        seed: int,
        source: str = "clean",
        defense: str = "none",
        upstream: str | None = None,
    ) -> dict:
        """The recipe of a classifier stage: its spec, data, trainer and seed, the data
        source and pirate defence, and the recipe hash of the stage that made its data."""
        return {
            "stage": "classifier",
            "spec": spec,
            "data": self.data_cfg,
            "trainer": self.trainer_cfg,
            "seed": seed,
            "source": source,
            "defense": defense,
            "upstream": upstream,
        }

    def run(self) -> dict:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic_text(
            self.run_dir / "pipeline_config.yaml", yaml.safe_dump(self.cfg, sort_keys=False)
        )
        t0 = time.perf_counter()
        sur = self.surrogates()
        prot = self.protector(sur)
        exp = self.export(prot, sur)
        if not _single_process_from_here():
            return {}
        clfs = self.classifiers()
        results = summarise(self.cfg, self.run_dir, exp, clfs)
        results["pipeline_seconds_this_invocation"] = round(time.perf_counter() - t0, 1)
        write_results(self.run_dir, results, yaml.safe_dump(self.cfg, sort_keys=True))
        write_report(self.run_dir, results)
        summary = self.stage_wandb("summary", self.seed)
        if summary:
            loggers = run_loggers(self.run_dir, summary, config=flatten_config(self.cfg))
            log_final_metrics(loggers, results)
            end_wandb_run(loggers)
        self._say(f"results: {self.run_dir / 'results.json'}, report: {self.run_dir / 'report.md'}")
        return results


def _stage_of(checkpoint: Path) -> str:
    """The stage name of ``<run_dir>/<stage>/checkpoints/last.ckpt``."""
    return Path(checkpoint).parent.parent.name


def _single_process_from_here() -> bool:
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


class StageLimitReached(Exception):
    """Raised after the stage named by ``stop_after`` (used to test resuming)."""


def _slug(defense: str) -> str:
    return (
        "none"
        if defense in ("none", "identity")
        else defense.replace(":", "_").replace("=", "").replace(",", "_").replace(".", "p")
    )


def export_stage(
    stage_dir: Path,
    protector_ckpt: Path,
    surrogate_ckpt: Path,
    data_cfg: dict,
    eval_defenses: list[str],
    run_dir: Path,
) -> dict:
    """Exports the RAEG-protected training split and measures it (see method_export_stage)."""
    from raeg_pl.lit.protector import load_surrogate
    from raeg_pl.methods.raeg import RAEGMethod

    dm = ImageClassificationDataModule(**data_cfg)
    dm.setup()
    method = RAEGMethod(protector_ckpt)
    results = method_export_stage(
        stage_dir, method, dm, eval_defenses, load_surrogate(surrogate_ckpt), data_cfg=data_cfg
    )
    results["protector_fingerprint"] = method.net.fingerprint()
    write_results(stage_dir, results, json.dumps(data_cfg, sort_keys=True))
    return results


def _accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` on uint8 images (N, C, H, W), in batches of 500."""
    correct = 0
    with torch.no_grad():
        for i in range(0, len(images), 500):
            logits = model(images[i : i + 500].float() / 255)
            correct += int((logits.argmax(1) == labels[i : i + 500]).sum())
    return correct / max(1, len(images))


def method_export_stage(
    stage_dir: Path,
    method,
    dm: ImageClassificationDataModule,
    eval_defenses: list[str],
    surrogate: torch.nn.Module,
    heldout: dict[str, torch.nn.Module] | None = None,
    data_cfg: dict | None = None,
    extra: dict | None = None,
    inference_per_class: int | None = None,
) -> dict:
    """Writes clean / protected (/ recovered) PNG folders of one method and measures them.

    Every figure comes from the stored 8-bit files: fidelity of the protected images,
    reversibility of the images an authorised user restores from them (reversible methods
    only), the surrogate's accuracy on the published training images, and inference-time
    protection: accuracy of the surrogate and of held-out clean-trained classifiers on
    protected held-out test images after each real defence.

    Args:
        stage_dir: the stage folder (gets ``clean/``, ``protected/``, ``recovered/``).
        method: a :class:`raeg_pl.methods.ProtectionMethod`.
        dm: the owner's data (set up); its training split is protected, its test split is
            used for inference-time protection.
        eval_defenses: real defence specs for the inference-time figures.
        surrogate: frozen classifier (logits from [0, 1] images).
        heldout: more frozen classifiers, by name, trained on clean data.
        data_cfg: recorded in the manifests.
        extra: more result fields.
        inference_per_class: per-class subset of the test split for the inference-time
            figures (None: all of it); attacks on every test image dominate a CPU budget.
    """
    from raeg_pl.io.protected import load_export, tensor_fingerprint, write_image_folder
    from raeg_pl.metrics import ImageQuality

    images, labels = dm.train_set.images, dm.train_set.labels
    files, classes = dm.train_files, dm.classes
    common = {"classes": classes, "files": files, "labels": labels}
    meta = {
        "method": method.config(),
        "source_fingerprint": tensor_fingerprint(images, labels),
        "data": data_cfg,
    }
    write_image_folder(stage_dir / "clean", images, kind="clean", **common, extra=meta)
    t0 = time.perf_counter()
    method.fit(images, labels)
    protected = method.protect(images, labels)
    protect_s = time.perf_counter() - t0
    write_image_folder(stage_dir / "protected", protected, kind="protected", **common, extra=meta)
    meta["method"] = method.config()  # fitting may have recorded more (rounds run...)
    # Everything below reads the stored files back, as a pirate or an authorised user would.
    p_images, p_labels, _, rels, _ = load_export(stage_dir / "protected")
    c_images, _, _, _, _ = load_export(stage_dir / "clean")
    q_prot, q_rec = ImageQuality(), ImageQuality()
    r_images = None
    if method.reversible:
        src_files = [Path(r).relative_to("train").as_posix() for r in rels]
        write_image_folder(
            stage_dir / "recovered",
            method.recover(p_images, p_labels),
            p_labels,
            classes,
            src_files,
            kind="recovered",
            extra=meta,
        )
        r_images = load_export(stage_dir / "recovered")[0]
    for i in range(0, len(c_images), 1024):
        q_prot.update(p_images[i : i + 1024], c_images[i : i + 1024])
        if r_images is not None:
            q_rec.update(r_images[i : i + 1024], c_images[i : i + 1024])
    qp = q_prot.compute()
    qr = q_rec.compute() if r_images is not None else None

    # Inference-time protection on held-out clean test images, after 8-bit storage.
    test_x, test_y = dm.test_set.images, dm.test_set.labels
    if inference_per_class is not None:
        from raeg_pl.data.datamodule import per_class_subset

        idx = per_class_subset(
            test_y, torch.arange(len(test_y)), inference_per_class, dm.num_classes, dm.seed
        )
        test_x, test_y = test_x[idx], test_y[idx]
    classifiers = {"surrogate": surrogate, **(heldout or {})}
    clean_acc = {k: _accuracy(m, test_x, test_y) for k, m in classifiers.items()}
    by_defense: dict[str, dict[str, float]] = {k: {} for k in classifiers}
    if method.protects_unseen:
        stored = method.protect(test_x, test_y)
        for spec in eval_defenses:
            defended = stored if spec in ("none", "identity") else apply_defense_uint8(stored, spec)
            for k, m in classifiers.items():
                by_defense[k][spec] = _accuracy(m, defended, test_y)

    def opt(q, key):
        return None if q is None else float(q[key])

    results = {
        "reversible": bool(method.reversible),
        "method": meta["method"],
        "psnr_protected": float(qp["psnr"]),
        "ssim_protected": float(qp["ssim"]),
        "linf_protected": float(qp["linf"]),
        "l2_protected": float(qp["l2"]),
        "psnr_recovered": opt(qr, "psnr"),
        "ssim_recovered": opt(qr, "ssim"),
        "exact_pixel_rate_recovered": opt(qr, "exact_pixel_rate"),
        "surrogate_acc_clean": clean_acc["surrogate"],
        "surrogate_acc_protected": by_defense["surrogate"].get("none"),
        "surrogate_acc_protected_by_defense": by_defense["surrogate"],
        "heldout_acc_clean": {k: v for k, v in clean_acc.items() if k != "surrogate"},
        "heldout_acc_protected_by_defense": {
            k: v for k, v in by_defense.items() if k != "surrogate"
        },
        # The published images themselves (what a pirate downloads), as stored.
        "surrogate_acc_protected_train": _accuracy(surrogate, p_images, p_labels),
        "surrogate_acc_clean_train": _accuracy(surrogate, c_images, p_labels),
        "exported_images": len(images),
        "test_images": len(dm.test_set),
        "inference_test_images": len(test_x),
        "protect_seconds": round(protect_s, 1),
        "protect_img_per_s": round(len(images) / max(protect_s, 1e-9), 1),
        **(extra or {}),
    }
    write_results(stage_dir, results, json.dumps([meta["method"], data_cfg], sort_keys=True))
    return results


def summarise(cfg: dict, run_dir: Path, exp: dict, clfs: dict[str, dict]) -> dict:
    """The experiment's headline figures, from the stage results."""
    defenses = list(cfg.get("pirate_defenses") or ["none"])
    by_def = {d: clfs[f"pirate_{_slug(d)}"] for d in defenses}
    clean_by_def = {d: clfs[f"clean_{_slug(d)}"] for d in defenses}
    prot = _read(run_dir / "protector")
    sur = [_read(run_dir / f"surrogate_{i}") for i in range(len(cfg["surrogates"]))]
    base = clean_by_def.get("none") or next(iter(clean_by_def.values()))
    pirate = by_def.get("none") or next(iter(by_def.values()))
    return {
        "profile": cfg.get("profile"),
        **{
            k: exp[k]
            for k in (
                "psnr_protected",
                "ssim_protected",
                "linf_protected",
                "psnr_recovered",
                "ssim_recovered",
                "exact_pixel_rate_recovered",
                "surrogate_acc_clean",
                "surrogate_acc_protected",
                "surrogate_acc_protected_by_defense",
                "surrogate_acc_protected_train",
                "surrogate_acc_clean_train",
            )
        },
        "clean_acc": base["test_acc"],
        "clean_acc_peak": base["test_acc_peak"],
        "clean_acc_by_defense": {d: r["test_acc"] for d, r in clean_by_def.items()},
        "pirate_acc": pirate["test_acc"],
        "pirate_acc_peak": pirate["test_acc_peak"],
        "pirate_acc_by_defense": {d: r["test_acc"] for d, r in by_def.items()},
        "pirate_acc_peak_by_defense": {d: r["test_acc_peak"] for d, r in by_def.items()},
        "authorized_acc": clfs["authorized"]["test_acc"],
        "authorized_acc_peak": clfs["authorized"]["test_acc_peak"],
        "surrogate_test_acc": [s["test_acc"] for s in sur],
        "protector_val": {k: v for k, v in prot["metrics"].items() if k.startswith("val/")},
        "splits": {
            "protected_train": exp["exported_images"],
            "protector": prot["splits"],
            "surrogates": [s["splits"] for s in sur],
            "pirate": pirate["splits"],
            "test": exp["test_images"],
        },
        "curves": {name: r["test_acc_curve"] for name, r in clfs.items()},
        "adv_mode": cfg["protector"]["model"].get("adv_mode", "targeted"),
    }


def write_report(run_dir: Path, results: dict) -> Path:
    """``report.md`` with the table, the protector's image grid, and accuracy / PSNR plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in results["curves"].items():
        ax[0].plot(
            range(1, len(curve) + 1),
            [100 * c for c in curve],
            label=name,
            linestyle="--" if name.startswith("clean") else "-",
        )
    ax[0].set(xlabel="epoch", ylabel="clean-test accuracy (%)", title="classifiers")
    ax[0].legend(fontsize=7)
    hist = _read(run_dir / "protector")["history"]
    ax[1].plot(
        [h["epoch"] + 1 for h in hist],
        [h.get("val/psnr_protected") for h in hist],
        "o-",
        label="protected",
    )
    ax[1].plot(
        [h["epoch"] + 1 for h in hist],
        [h.get("val/psnr_recovered") for h in hist],
        "s-",
        label="recovered",
    )
    ax[1].set(xlabel="protector epoch", ylabel="PSNR (dB, held-out, 8-bit)", title="protector")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=110)
    plt.close(fig)
    grids = sorted((run_dir / "protector" / "grids").glob("*.png"))
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    rows = [
        ("PSNR protected (dB)", f"{results['psnr_protected']:.2f}"),
        ("SSIM protected", f"{results['ssim_protected']:.4f}"),
        ("L-inf protected (8-bit levels, mean)", f"{results['linf_protected']:.1f}"),
        ("PSNR recovered from PNG (dB)", f"{results['psnr_recovered']:.2f}"),
        ("exact pixel rate recovered", f"{results['exact_pixel_rate_recovered']:.4f}"),
        ("surrogate acc clean test (%)", pct(results["surrogate_acc_clean"])),
        (
            "surrogate acc on the training images, clean / protected (%)",
            f"{pct(results['surrogate_acc_clean_train'])} / "
            f"{pct(results['surrogate_acc_protected_train'])}",
        ),
        *[
            (f"surrogate acc protected test, {d} (%)", pct(v))
            for d, v in results["surrogate_acc_protected_by_defense"].items()
        ],
        *[
            (f"clean-trained acc, pirate defence {d} (%)", pct(v))
            for d, v in results["clean_acc_by_defense"].items()
        ],
        *[
            (
                f"pirate acc final / peak, defence {d} (%)",
                f"{pct(v)} / {pct(results['pirate_acc_peak_by_defense'][d])}",
            )
            for d, v in results["pirate_acc_by_defense"].items()
        ],
        ("authorised acc (recovered data) (%)", pct(results["authorized_acc"])),
    ]
    lines = [
        f"# Protection experiment: {run_dir.name}",
        "",
        f"Profile: {results.get('profile') or 'custom'}; adversarial mode: {results['adv_mode']}."
        " All figures after 8-bit PNG storage; classifier accuracies on the clean test split"
        f" ({results['splits']['test']} images); protected training set:"
        f" {results['splits']['protected_train']} images.",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "![curves](curves.png)",
    ]
    if grids:
        rel = grids[-1].relative_to(run_dir)
        lines += [
            "",
            "Rows: original, protected, difference x10, recovered.",
            "",
            f"![grid]({rel.as_posix()})",
        ]
    path = run_dir / "report.md"
    write_atomic_text(path, "\n".join(lines) + "\n")
    return path


def main(args: list[str]) -> int:
    """``raeg pipeline --config FILE [--run_dir DIR] [key.path=value ...]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="raeg pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="pipeline YAML (experiments/protect/*.yaml)")
    ap.add_argument("--run_dir", default=None, help="run directory (default: the config's)")
    ap.add_argument("--stop_after", default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. protector.max_epochs=2")
    ns = ap.parse_args(args)
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
