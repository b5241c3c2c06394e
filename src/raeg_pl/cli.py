"""The one entry point, ``raeg``.

``raeg fit|validate|test|predict --config experiments/...yaml`` train and evaluate a
classifier through LightningCLI (typed constructor arguments are the config schema). Every
run writes its run directory: the resolved config, checkpoints, CSV (and optionally wandb)
logs, and ``results.json`` with metrics, the learning curve, git commit and config hash.

Config files may start with ``defaults: [relative/base.yaml, ...]``; the named files are
applied first, in order, then the file itself, so an experiment is one small override file
on top of the presets in ``experiments/_base/``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from raeg_pl.data.datamodule import ImageClassificationDataModule
from raeg_pl.lit.classifier import ClassifierLitModule
from raeg_pl.utils.run import to_float_dict, write_results
from raeg_pl.utils.trainer import run_callbacks, run_loggers

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


# ------------------------------------------------------------------ config composition
def _load_with_defaults(path: Path, seen: tuple[Path, ...] = ()) -> list[str]:
    """A config file and its ``defaults`` chain as YAML texts, bases first."""
    path = path.resolve()
    if path in seen:
        raise ValueError(f"{path}: circular 'defaults' chain through {[str(p) for p in seen]}")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a mapping, got {type(data).__name__}")
    bases = data.pop("defaults", []) or []
    if isinstance(bases, str):
        bases = [bases]
    texts: list[str] = []
    for base in bases:
        texts += _load_with_defaults(path.parent / base, (*seen, path))
    if data:
        texts.append(yaml.safe_dump(data, sort_keys=False))
    return texts


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
            for text in _load_with_defaults(Path(value)):
                out += ["--config", text]
        else:
            out += ["--config", value]
    return out


# ------------------------------------------------------------------------ LightningCLI
class RaegCLI(LightningCLI):
    """LightningCLI with run directories, results.json and data-to-model links."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_dir",
            type=str,
            default="runs/default",
            help="run directory: config, checkpoints, logs, results.json",
        )
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="evaluate on the clean test split after fit",
        )
        parser.add_argument(
            "--wandb.enabled",
            type=bool,
            default=False,
            help="log to Weights & Biases as well as CSV",
        )
        parser.add_argument("--wandb.project", type=str, default="raeg-pl")
        parser.add_argument("--wandb.group", type=str | None, default=None)
        parser.add_argument("--wandb.name", type=str | None, default=None)
        parser.add_argument("--wandb.tags", type=list[str], default=[])
        parser.add_argument(
            "--wandb.offline",
            type=bool,
            default=False,
            help="offline mode (also set by WANDB_MODE=offline)",
        )
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.channels", "model.in_chans", apply_on="instantiate")

    def _cfg(self) -> Any:
        return self.config_init[self.subcommand] if self.subcommand else self.config_init

    def instantiate_trainer(self, **kwargs: Any):
        cfg = self._cfg()
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        callbacks, self.history = run_callbacks(cfg["run_dir"], trainer_cfg.get("callbacks"))
        kwargs = {
            "default_root_dir": str(cfg["run_dir"]),
            "logger": run_loggers(cfg["run_dir"], dict(cfg["wandb"])),
            "callbacks": callbacks,
            **kwargs,
        }
        return super().instantiate_trainer(**kwargs)

    def _write_results(self, stage: str) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero or trainer.fast_dev_run:
            return
        cfg = self._cfg()
        config_text = self.parser.dump(self.config, skip_none=False) if self.config else ""
        dm = self.datamodule
        metrics = {**getattr(self, "_fit_metrics", {}), **to_float_dict(trainer.callback_metrics)}
        results = {
            "stage": stage,
            "metrics": metrics,
            "history": self.history.history if hasattr(self, "history") else [],
            "splits": dm.split_sizes if getattr(dm, "train_set", None) is not None else {},
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "precision": str(trainer.precision),
        }
        for key in ("test/acc", "val/acc"):
            if key in metrics:
                results[key.replace("/", "_")] = metrics[key]
        write_results(cfg["run_dir"], results, config_text)

    def after_fit(self) -> None:
        # trainer.test replaces callback_metrics: keep the final fit metrics first.
        self._fit_metrics = to_float_dict(self.trainer.callback_metrics)
        if self._cfg()["test_after_fit"] and not self.trainer.fast_dev_run:
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        self._write_results("fit")

    def after_validate(self) -> None:
        self._write_results("validate")

    def after_test(self) -> None:
        self._write_results("test")


def lightning_main(args: list[str] | None = None, run: bool = True) -> RaegCLI:
    """Runs (or, with ``run=False``, only parses and instantiates) a LightningCLI command."""
    return RaegCLI(
        ClassifierLitModule,
        ImageClassificationDataModule,
        args=expand_config_args(list(sys.argv[1:] if args is None else args)),
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


USAGE = """usage: raeg <command> [options]

Classifier training (LightningCLI; `raeg <command> --help` lists every option):
  fit        train a classifier:  raeg fit --config experiments/surrogate/quick.yaml
  validate   evaluate on the validation split
  test       evaluate on the clean test split
  predict    predict labels

Protection experiments:
  pipeline   surrogate -> protector -> export -> pirates / authorised / clean baseline:
             raeg pipeline --config experiments/protect/quick.yaml [key.path=value ...]
"""


def main(args: list[str] | None = None) -> int:
    """The ``raeg`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in LIGHTNING_SUBCOMMANDS:
        lightning_main(argv)
        return 0
    if argv[0] == "pipeline":
        from raeg_pl.pipeline import main as pipeline_main

        return pipeline_main(argv[1:])
    print(f"raeg: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
