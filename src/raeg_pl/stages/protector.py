"""Stage 2: the RAEG protector trained against the frozen surrogates; the owner's key file."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L

from raeg_pl.config import deep_merge
from raeg_pl.data.datamodule import ImageClassificationDataModule
from raeg_pl.stages.common import (
    StageRunner,
    make_trainer,
    resume_checkpoint,
    stage_of,
)
from raeg_pl.utils.run import to_float_dict, write_results
from raeg_pl.utils.trainer import end_wandb_run

KEY_FILE = "owner.raegkey"


def protector_recipe(runner: StageRunner, spec: dict, surrogate_ckpts: list[Path]) -> dict:
    """The protector stage's recipe: its spec, data, trainer, seed and the surrogates' hashes.

    The optional loss terms named at their defaults are left out of ``spec.model``
    (:func:`raeg_pl.lit.protector.recipe_protector_spec`): the same fit, the same hash.
    """
    from raeg_pl.lit.protector import recipe_protector_spec

    return {
        "stage": "protector",
        "spec": recipe_protector_spec(spec),
        "data": runner.data_cfg,
        "trainer": runner.trainer_cfg,
        "seed": runner.seed,
        "upstream": [runner.recipes.get(stage_of(p)) for p in surrogate_ckpts],
    }


def run_protector(
    runner: StageRunner,
    surrogate_ckpts: list[Path],
    name: str = "protector",
    spec: dict | None = None,
) -> Path:
    """Trains (or finds done) a protector against ``surrogate_ckpts`` in ``<run_dir>/<name>``.

    Args:
        runner: the run's stage runner.
        surrogate_ckpts: the frozen surrogates' checkpoints.
        name: the stage folder.
        spec: the protector config (default: the config's ``protector`` section).

    Returns:
        The protector's last checkpoint.
    """
    from raeg_pl.lit.protector import ProtectorLitModule

    spec = spec or runner.cfg["protector"]

    def run(stage_dir):
        L.seed_everything(runner.seed, workers=True)
        data = deep_merge(runner.data_cfg, spec.get("data") or {})
        dm = ImageClassificationDataModule(**data)
        model = ProtectorLitModule(
            surrogate_checkpoints=[str(p) for p in surrogate_ckpts],
            in_channels=dm.channels,
            **spec["model"],
        )
        trainer, history = make_trainer(
            stage_dir,
            deep_merge(runner.trainer_cfg, spec.get("trainer") or {}),
            int(spec["max_epochs"]),
            runner.stage_wandb(name, runner.seed),
            monitor=None,
            gradient_clip_val=spec.get("gradient_clip_val", 1.0),
        )
        t0 = time.perf_counter()
        trainer.fit(model, datamodule=dm, ckpt_path=resume_checkpoint(stage_dir))
        fit_s = time.perf_counter() - t0
        metrics = to_float_dict(trainer.callback_metrics)
        end_wandb_run(trainer.loggers)
        results = {
            "metrics": metrics,
            "history": history.history,
            "splits": dm.split_sizes,
            "fit_seconds": round(fit_s, 1),
            "precision": str(trainer.precision),
            "recoveries": model.recoveries,
            "protector_fingerprint": model.protector.fingerprint(),
            "protector_config": model.protector.config,
            "model": spec["model"],
        }
        write_results(stage_dir, results, json.dumps(spec, sort_keys=True))
        return results

    runner.run_stage(name, run, protector_recipe(runner, spec, surrogate_ckpts))
    return runner.run_dir / name / "checkpoints" / "last.ckpt"


def write_owner_key(
    run_dir: Path,
    checkpoint: Path,
    protector_results: dict,
    classes: list[str],
    say: Callable[[str], None] = print,
) -> dict:
    """Writes ``<run_dir>/owner.raegkey``, the standalone key of the trained protector.

    Skipped when the file exists and holds this protector (same fingerprint and class
    names), and for an encoder-decoder protector, which key files cannot hold.

    Args:
        run_dir: the run directory.
        checkpoint: the protector stage's checkpoint.
        protector_results: the protector stage's results (``protector_fingerprint``,
            ``protector_config``).
        classes: the training data's class names in label index order.
        say: prints a progress line.

    Returns:
        ``{"key_file": path or None, "key_fingerprint": ..., "key_skipped": reason or None}``
        for the run's ``results.json``.

    Raises:
        raeg_pl.io.keyfile.KeyFileError: the checkpoint cannot be exported.
    """
    from raeg_pl.io.keyfile import KeyFileError, export_key, read_key

    out = Path(run_dir) / KEY_FILE
    generator = (protector_results.get("protector_config") or {}).get("generator", "invertible")
    if generator != "invertible":
        reason = (
            f"the {generator!r} protector is not invertible; key files hold invertible "
            "protectors only"
        )
        say(f"key file: not written ({reason})")
        return {"key_file": None, "key_fingerprint": None, "key_skipped": reason}
    fingerprint = protector_results.get("protector_fingerprint")
    if out.is_file():
        try:
            key = read_key(out)
            current = key.fingerprint == fingerprint and (
                not key.conditional or list(key.classes) == list(classes)
            )
        except KeyFileError as e:
            say(f"key file: {out} unreadable ({e}); writing it again")
            current = False
        if current:
            say(f"key file: {out} holds this protector, kept")
            return {"key_file": str(out), "key_fingerprint": fingerprint, "key_skipped": None}
    written = export_key(checkpoint, out, classes=list(classes))
    say(f"key file: {out} written (raeg protect --key {out} ...)")
    return {"key_file": str(out), "key_fingerprint": written, "key_skipped": None}


__all__ = ["KEY_FILE", "protector_recipe", "run_protector", "write_owner_key"]
