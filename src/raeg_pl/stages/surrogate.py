"""Stage 1: the surrogate classifiers, trained on the owner's clean training split."""

from __future__ import annotations

from pathlib import Path

from raeg_pl.stages.common import StageRunner


def run_surrogates(runner: StageRunner) -> list[Path]:
    """Trains (or finds done) every surrogate of ``cfg["surrogates"]``: ``surrogate_<i>``.

    Surrogate ``i`` is trained with seed ``seed + i``.

    Returns:
        The surrogates' last checkpoints, in config order.
    """
    paths = []
    for i, spec in enumerate(runner.cfg["surrogates"]):
        name = f"surrogate_{i}"

        def run(stage_dir, spec=spec, i=i):
            return runner.train(stage_dir, spec, runner.seed + i)

        runner.run_stage(name, run, runner.classifier_recipe(spec, runner.seed + i))
        paths.append(runner.run_dir / name / "checkpoints" / "last.ckpt")
    return paths


__all__ = ["run_surrogates"]
