"""The one entry point, ``raeg``.

``raeg fit|validate|test|predict --config experiments/...yaml`` train and evaluate a
classifier through LightningCLI (typed constructor arguments are the config schema). Every
run writes its run directory: the resolved config, checkpoints, CSV (and optionally wandb)
logs, and ``results.json`` with metrics, the learning curve, git commit and config hash.
``raeg pipeline``, ``raeg grid``, ``raeg table`` and the folder tools (``export-key``,
``protect``, ``restore``, ``verify``) are dispatched to their modules, imported on use so
each command loads only what it needs.

Config files may start with ``defaults: [relative/base.yaml, ...]`` (see
:mod:`raeg_pl.config`): the named files are applied first, in order, then the file itself.
"""

from __future__ import annotations

import sys

from raeg_pl.config import expand_config_args

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def lightning_main(args: list[str] | None = None, run: bool = True):
    """Runs (or, with ``run=False``, only parses and instantiates) a LightningCLI command."""
    # Imported here: the folder tools (protect, restore...) must start without Lightning.
    from raeg_pl.trainer_cli import lightning_main as _main

    return _main(expand_config_args(list(sys.argv[1:] if args is None else args)), run=run)


USAGE = """usage: raeg <command> [options]

Classifier training (LightningCLI; `raeg <command> --help` lists every option):
  fit        train a classifier:  raeg fit --config experiments/surrogate/quick.yaml
  validate   evaluate on the validation split
  test       evaluate on the clean test split
  predict    predict labels

Protection experiments:
  pipeline   surrogate -> protector -> export -> pirates / authorised / clean baseline:
             raeg pipeline --config experiments/protect/quick.yaml [key.path=value ...]
             (writes <run_dir>/results.json, report.md and the key file owner.raegkey)
  grid       one table's runs: methods x pirate architectures x defences x seeds:
             raeg grid --config experiments/main/quick.yaml [--rows R ..] [--archs A ..]
             raeg grid --config experiments/main/quick.yaml --check  (builds, trains nothing)

Protecting real image folders (`raeg <command> --help` lists every option):
  export-key write a standalone key file:  raeg export-key --checkpoint C.ckpt --out K
  protect    raeg protect --key K --input IN --output OUT [--lossless] [--sidecar DIR]
             [--device cpu] [--batch-size N]
  restore    raeg restore --key K --input OUT --output REC [--sidecar DIR]
  verify     raeg verify --input DIR   (a protected or restored folder vs its manifest)

Data:
  data       write a bundled dataset as an ImageFolder into the cache (no download):
             raeg data digits [--out DIR] [--seed 0] [--test-fraction 0.2] [--size 32]
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
    if argv[0] == "grid":
        from raeg_pl.grid import main as grid_main

        return grid_main(argv[1:])
    if argv[0] == "table":
        from raeg_pl.tables import main as table_main

        return table_main(argv[1:])
    if argv[0] == "data":
        from raeg_pl.data.digits import main as data_main

        return data_main(argv[1:])
    if argv[0] in ("export-key", "protect", "restore", "verify"):
        from raeg_pl.io.commands import main as io_main

        return io_main(argv)
    print(f"raeg: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
