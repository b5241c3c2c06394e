"""Stages 4-6: pirates on the protected export, authorised on the recovered, clean baselines.

Every classifier uses the ``pirate`` recipe with seed ``seed + 100``; ``pirate_<d>`` and
``clean_<d>`` are trained after pirate defence ``d`` (one of ``pirate_defenses``).
"""

from __future__ import annotations

from raeg_pl.stages.common import StageRunner, slug


def classifier_jobs(cfg: dict) -> list[tuple[str, str, str]]:
    """``(stage name, data source, pirate defence)`` of every classifier stage, in run order."""
    defenses = list(cfg.get("pirate_defenses") or ["none"])
    jobs = [(f"pirate_{slug(d)}", "protected", d) for d in defenses]
    jobs.append(("authorized", "recovered", "none"))
    jobs += [(f"clean_{slug(d)}", "clean", d) for d in defenses]
    return jobs


def run_classifiers(runner: StageRunner) -> dict[str, dict]:
    """Trains the pirates, the authorised model and the clean baselines on the ``export``.

    Returns:
        Each stage's results, by stage name.
    """
    spec = runner.cfg["pirate"]
    out = {}
    for name, source, defense in classifier_jobs(runner.cfg):

        def run(stage_dir, source=source, defense=defense):
            data = {
                "train_dir": str(runner.run_dir / "export" / source / "train"),
                "train_defense": None if defense == "none" else defense,
                "train_per_class": None,
            }
            return runner.train(
                stage_dir,
                spec,
                runner.seed + 100,
                data,
                extra={"source": source, "defense": defense},
            )

        upstream = None if source == "clean" else runner.recipes.get("export")
        recipe = runner.classifier_recipe(spec, runner.seed + 100, source, defense, upstream)
        out[name] = runner.run_stage(name, run, recipe)
    return out


__all__ = ["classifier_jobs", "run_classifiers"]
