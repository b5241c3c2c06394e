"""What every run directory's Trainer gets: CSV (+ optional wandb) logs, checkpoints, history."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from raeg_pl.utils.callbacks import MetricHistory, ProgressReport
from raeg_pl.utils.quantize import to_uint8

DEFAULT_WANDB_PROJECT = "raeg-pl"


class RaegWandbLogger(WandbLogger):
    """A WandbLogger whose ``log_image`` takes the project's float images in [0, 1].

    ``wandb.Image`` casts tensor and array pixels to uint8 as they are (it expects
    [0, 255]), so a float image in [0, 1] would be stored almost black. Float tensors and
    arrays, (C, H, W) tensors or (H, W, C) arrays in [0, 1], are stored as 8-bit first
    (:func:`raeg_pl.utils.quantize.to_uint8`); uint8 data, PIL images and file paths pass
    through unchanged.
    """

    def log_image(
        self, key: str, images: list[Any], step: int | None = None, **kwargs: Any
    ) -> None:
        if isinstance(images, list):
            images = [self._stored(img) for img in images]
        super().log_image(key, images, step, **kwargs)

    @staticmethod
    def _stored(img: Any) -> Any:
        if isinstance(img, torch.Tensor) and img.is_floating_point():
            return to_uint8(img.detach().float().cpu())
        if isinstance(img, np.ndarray) and np.issubdtype(img.dtype, np.floating):
            return to_uint8(torch.from_numpy(img.astype(np.float32))).numpy()
        return img


def wandb_settings(
    base: dict | None,
    *,
    table: str | None = None,
    row: str | None = None,
    seed: int | None = None,
    stage: str | None = None,
    profile: str | None = None,
) -> dict | None:
    """The wandb settings of one run, derived from where it sits in an experiment.

    Runs of one table share a group, so the wandb UI lists a table's rows, stages and seeds
    together; tags make each facet filterable on its own.

    Args:
        base: the config's ``wandb`` section (``enabled``, ``project``, ``group``, ``name``,
            ``tags``, ``offline``); its values are kept where nothing is derived.
        table: the experiment table, e.g. ``"main-quick"``: the run's group.
        row: the table row (method or variant), e.g. ``"raeg"``.
        seed: the run's seed.
        stage: the pipeline stage, e.g. ``"protector"``: the run's job type.
        profile: the config profile, e.g. ``"quick"``.

    Returns:
        ``base`` plus ``project`` (base's or ``"raeg-pl"``), ``group`` (``table``), ``name``
        (``"<row>-<stage>-s<seed>"``, parts that are None left out), ``tags`` (base's, then
        ``[table, row, profile, "seed<seed>", stage]`` without Nones or repeats) and
        ``job_type`` (``stage``); None when ``base`` is None or not enabled.
    """
    if not base or not base.get("enabled"):
        return None
    out = dict(base)
    out["project"] = base.get("project") or DEFAULT_WANDB_PROJECT
    if table is not None:
        out["group"] = table
    parts = [row, stage, None if seed is None else f"s{seed}"]
    if any(p is not None for p in parts):
        out["name"] = "-".join(str(p) for p in parts if p is not None)
    facets = [table, row, profile, None if seed is None else f"seed{seed}", stage]
    tags: list[str] = []
    for tag in [*(base.get("tags") or []), *facets]:
        if tag is not None and str(tag) not in tags:
            tags.append(str(tag))
    out["tags"] = tags
    if stage is not None:
        out["job_type"] = stage
    return out


def flatten_config(cfg: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """A nested config as one flat dict with ``a.b.c`` keys (lists stay values).

    The keys are the ``key.path`` names that ``raeg pipeline`` overrides and wandb sweeps
    use, so a run's config and a sweep's parameters line up.
    """
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, sep, name))
        else:
            flat[name] = value
    return flat


def run_loggers(
    run_dir: str | os.PathLike,
    wandb: dict[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
) -> list[Logger]:
    """A CSV logger writing into ``run_dir`` itself, plus wandb when ``wandb["enabled"]``.

    Args:
        run_dir: the run directory; wandb writes its run folder under ``run_dir/wandb``.
        wandb: ``enabled``, ``project``, ``group``, ``name``, ``tags``, ``job_type``,
            ``offline`` (see :func:`wandb_settings`). Offline mode is also taken from
            ``WANDB_MODE=offline`` and needs no account; ``WANDB_MODE=disabled`` wins over
            ``offline``. Under a sweep agent (``WANDB_SWEEP_ID`` set) the agent's
            ``WANDB_PROJECT`` wins over ``project``.
        config: the run's flat config (e.g. :func:`flatten_config` of the experiment),
            stored as the wandb run's config.
    """
    run_dir = Path(run_dir)
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="", version="")]
    if wandb and wandb.get("enabled"):
        mode = os.environ.get("WANDB_MODE")
        # WandbLogger(offline=True) sets WANDB_MODE itself, which would undo "disabled".
        offline = mode != "disabled" and (bool(wandb.get("offline")) or mode == "offline")
        extra: dict[str, Any] = {}
        if wandb.get("job_type"):
            extra["job_type"] = str(wandb["job_type"])
        if config:
            extra["config"] = dict(config)
        # A run started by a sweep agent belongs to the sweep's project, which the agent
        # passes in WANDB_PROJECT; an explicit project would detach it from the sweep.
        in_sweep = bool(os.environ.get("WANDB_SWEEP_ID"))
        project = (os.environ.get("WANDB_PROJECT") if in_sweep else None) or wandb.get("project")
        loggers.append(
            RaegWandbLogger(
                project=project or DEFAULT_WANDB_PROJECT,
                group=wandb.get("group"),
                name=wandb.get("name") or run_dir.name,
                tags=list(wandb.get("tags") or []),
                save_dir=str(run_dir),
                offline=offline,
                **extra,
            )
        )
    return loggers


def log_final_metrics(
    loggers: Iterable[Logger] | Logger | None, metrics: Mapping[str, Any]
) -> bool:
    """Writes an experiment's final figures to the summary of its wandb run.

    The summary is what the wandb tables and sweeps read as a run's result (a sweep's
    ``metric.name`` is looked up there). Other loggers are left alone; their runs record
    the same figures in ``results.json``.

    Args:
        loggers: the Trainer's loggers (``trainer.loggers``) or one logger.
        metrics: JSON-like figures, e.g. the pipeline's ``results.json`` content; nested
            mappings stay nested in the summary.

    Returns:
        True when a wandb run received the figures (False without a WandbLogger, and on
        ranks other than 0).
    """
    from lightning.pytorch.utilities import rank_zero_only

    if loggers is None or rank_zero_only.rank != 0:
        return False
    if isinstance(loggers, Logger):
        loggers = [loggers]
    written = False
    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        logger.experiment.summary.update(dict(metrics))
        written = True
    return written


def end_wandb_run(loggers: Iterable[Logger] | Logger | None = None) -> bool:
    """Finishes the open wandb run so that the next stage's WandbLogger starts its own.

    Lightning's WandbLogger reuses a run that is still open (``wandb.run``), so without this
    every stage of a pipeline would log into the first stage's run. Under a sweep agent
    (``WANDB_SWEEP_ID`` set) the open run is the agent's trial and stays open: every stage
    and the final summary belong to it.

    Args:
        loggers: the stage's loggers; when given, nothing is finished unless one of them is
            a WandbLogger (another component's run is left alone).

    Returns:
        True when a run was finished.
    """
    if os.environ.get("WANDB_SWEEP_ID"):
        return False
    if loggers is not None:
        if isinstance(loggers, Logger):
            loggers = [loggers]
        if not any(isinstance(lg, WandbLogger) for lg in loggers):
            return False
    try:
        import wandb
    except ImportError:  # the optional extra is not installed: no run can be open
        return False
    if wandb.run is None:
        return False
    wandb.finish()
    return True


# Lightning messages that say nothing about the run: advertising tips (logged at INFO by
# lightning.pytorch.utilities.rank_zero) and warnings about non-empty log and checkpoint
# folders, which every resumed stage and every stage folder holding its recipe.json has.
_LIGHTNING_TIPS = "💡 Tip:"
_NOT_EMPTY_WARNINGS = (
    r"Checkpoint directory .* exists and is not empty",
    r"Experiment logs directory .* exists and is not empty",
)
# Lightning 2.6's pytree helper builds torch's deprecated LeafSpec: a FutureWarning at the
# end of every fit that names neither the run nor anything its user can change.
_LEAFSPEC_WARNING = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
# Lightning's rank-zero messages go to one of these loggers (whichever package set it last).
LIGHTNING_RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)


class _DropTips(logging.Filter):
    """Drops Lightning's advertising tips."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_LIGHTNING_TIPS)


def quiet_lightning() -> None:
    """Hides Lightning's advertising tips, its "directory exists and is not empty"
    warnings and its use of torch's deprecated ``LeafSpec`` (idempotent; every run's
    callbacks call it)."""
    for name in LIGHTNING_RANK_ZERO_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in log.filters):
            log.addFilter(_DropTips())
    for message in _NOT_EMPTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
    warnings.filterwarnings("ignore", message=_LEAFSPEC_WARNING, category=FutureWarning)


#: Set to 1 to keep a bf16 precision on a CPU without native bf16 instructions.
CPU_BF16_ENV = "RAEG_CPU_BF16"
_PRECISION_NOTICES: set[tuple[str, str]] = set()


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX-512 BF16/AMX, as oneDNN reports it).

    Elsewhere (AVX2 only) bf16 autocast is emulated: a training step of the quick profile's
    classifiers at batch 64 took 5-17 times as long in bf16 as in float32 on an AVX2 EPYC
    (``benchmarks/bench_precision.py``).
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the oneDNN query
        return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2")


def effective_precision(precision: Any, accelerator: Any = "auto") -> Any:
    """The Trainer precision to run with: ``precision``, except a bf16 one on a CPU that has
    no native bf16, which runs in ``"32-true"`` (one notice per process says so; set
    ``RAEG_CPU_BF16=1`` to keep bf16 there). The config and the recipe keep what was asked;
    stages record the precision they ran with.

    Args:
        precision: the config's Trainer precision (``"bf16-mixed"``, ``"32-true"``, ...).
        accelerator: the config's Trainer accelerator (``"cpu"``, ``"gpu"``, ``"auto"``).
    """
    if precision is None or "bf16" not in str(precision):
        return precision
    on_cpu = str(accelerator) == "cpu" or (
        str(accelerator) in ("auto", "None") and not torch.cuda.is_available()
    )
    if not on_cpu or os.environ.get(CPU_BF16_ENV) == "1" or cpu_has_fast_bf16():
        return precision
    key = (str(precision), str(accelerator))
    if key not in _PRECISION_NOTICES:
        _PRECISION_NOTICES.add(key)
        logging.getLogger("raeg_pl").warning(
            "precision %s asked on a CPU without native bf16 (%s): running in 32-true, "
            "5-17x faster there (%s=1 keeps bf16)",
            precision,
            torch.backends.cpu.get_cpu_capability(),
            CPU_BF16_ENV,
        )
    return "32-true"


def stage_label(run_dir: str | os.PathLike) -> str:
    """How progress lines name a run folder: its name, or ``pirates/<row>/<arch>/...`` for
    a grid's pirate (whose last folder alone, ``seed<k>``, says little)."""
    parts = Path(run_dir).parts
    if "pirates" in parts:
        i = len(parts) - 1 - parts[::-1].index("pirates")
        return "/".join(parts[i:])
    return Path(run_dir).name or str(run_dir)


def run_callbacks(
    run_dir: str | os.PathLike,
    callbacks: list[Callback] | None = None,
    monitor: str | None = "val/acc",
    mode: str = "max",
    progress_every_s: float = 60.0,
) -> tuple[list[Callback], MetricHistory]:
    """``callbacks`` plus a MetricHistory, a last/best ModelCheckpoint, an LR monitor and a
    :class:`ProgressReport` (one line per epoch, one every ``progress_every_s`` seconds
    within an epoch); Lightning's tips and non-empty-folder warnings are hidden."""
    quiet_lightning()
    callbacks = list(callbacks or [])
    history = MetricHistory()
    callbacks.append(history)
    if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
        dirpath = str(Path(run_dir) / "checkpoints")
        # Lightning writes last.ckpt only in a step where a top-k checkpoint was written (for
        # a monitored metric: only when it improved), so an unmonitored checkpoint whose one
        # slot holds the newest epoch writes it: a stage stopped mid-training resumes from
        # its last finished epoch, not from its best one or from scratch. last.ckpt is a
        # link to latest.ckpt, not a second copy of the same weights.
        callbacks.append(
            ModelCheckpoint(dirpath=dirpath, filename="latest", save_last="link", save_top_k=1)
        )
        if monitor:
            callbacks.append(
                ModelCheckpoint(
                    dirpath=dirpath, filename="best", monitor=monitor, mode=mode, save_top_k=1
                )
            )
    callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    if not any(isinstance(c, ProgressReport) for c in callbacks):
        callbacks.append(ProgressReport(stage_label(run_dir), every_s=progress_every_s))
    return callbacks, history
