"""LightningCLI for classifiers: run directories, results.json, data-to-model links."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from raeg_pl.data.datamodule import ImageClassificationDataModule
from raeg_pl.lit.classifier import ClassifierLitModule
from raeg_pl.utils.run import to_float_dict, write_results
from raeg_pl.utils.trainer import effective_precision, run_callbacks, run_loggers


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
        if trainer_cfg.get("precision") is not None:
            kwargs["precision"] = effective_precision(
                trainer_cfg["precision"], trainer_cfg.get("accelerator", "auto")
            )
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
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
