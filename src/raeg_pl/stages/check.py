"""Builds everything a grid will train or apply, on a tiny input, before any stage runs.

:func:`raeg_pl.config.validate_grid_config` checks names; this module builds: every
surrogate and pirate architecture (one forward pass on 2 images of the dataset's channels,
size and class count), every row's protector network through the same
:class:`~raeg_pl.lit.protector.ProtectorLitModule` the protector stage constructs (the
row's merged protector config, label conditioning and class count included; one forward
and one inverse pass), and every row's method object through
:func:`raeg_pl.methods.create_method`, the RAEG rows on their freshly built protector and
the baselines on freshly initialised surrogates of the configured architectures; every
pirate defence is applied to a tiny batch (its data part) or run for one training step on
every pirate architecture (adversarial training, strong augmentation). Nothing
is trained, nothing is written outside a temporary folder, and a CPU does it in seconds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import lightning as L
import torch

from raeg_pl.config import (
    grid_pirates,
    parse_adv_train,
    parse_pirate_defense,
    row_method_params,
    row_protector_spec,
    row_spec,
)
from raeg_pl.data import DatasetError, ImageClassificationDataModule

# CIFAR-10's geometry, used when the data is not on this machine (``--check`` on a laptop).
CIFAR10_GEOMETRY = (3, 10, (32, 32))


class GridBuildError(ValueError):
    """Rows, architectures or surrogates of a grid config cannot be built."""


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()


def data_geometry(data_cfg: dict) -> tuple[int, int, tuple[int, int]]:
    """``(channels, classes, (H, W))`` of a data config's images, without decoding them.

    The data is located but never downloaded; CIFAR-10 that is not on this machine is
    checked with its known geometry.

    Raises:
        DatasetError: a dataset other than CIFAR-10 that cannot be found.
    """
    dm = ImageClassificationDataModule(**{**data_cfg, "download": False})
    try:
        located = dm.locate()
        channels, classes = dm.channels, dm.num_classes
    except DatasetError:
        if dm.dataset != "cifar10":
            raise
        channels, classes, size = CIFAR10_GEOMETRY
        return channels, classes, tuple(dm.image_size or size)
    if dm.image_size:
        return channels, classes, tuple(dm.image_size)
    if located.train is None:  # torchvision's CIFAR-10 batches
        return channels, classes, CIFAR10_GEOMETRY[2]
    from PIL import Image

    for path in sorted(located.train.rglob("*")):
        if path.is_file():
            try:
                with Image.open(path) as img:
                    return channels, classes, (img.height, img.width)
            except OSError:
                continue
    raise DatasetError(f"{located.train}: no readable image")


def test_class_counts(data_cfg: dict) -> dict[str, int] | None:
    """Images per class folder of the data's test split, counted by name without decoding.

    None when the data is not on this machine or is not a folder (torchvision's CIFAR-10
    batches: 1,000 per class).
    """
    from raeg_pl.io.reader import is_image_file

    dm = ImageClassificationDataModule(**{**data_cfg, "download": False})
    try:
        test = dm.locate().test
    except DatasetError:
        return None
    if test is None:
        return None
    return {
        d.name: sum(1 for f in d.iterdir() if f.is_file() and is_image_file(f.name))
        for d in sorted(test.iterdir())
        if d.is_dir()
    }


def check_inference_subset(cfg: dict) -> list[str]:
    """``inference_per_class`` against the test split: one line when a class has fewer."""
    wanted = cfg.get("inference_per_class")
    if wanted is None:
        return []
    counts = test_class_counts(cfg.get("data") or {})
    if not counts:
        return []
    rarest = min(counts, key=counts.get)
    if counts[rarest] >= int(wanted):
        return []
    return [
        f"inference_per_class: {wanted} test images per class asked, but class {rarest!r} of "
        f"the test split has only {counts[rarest]}; set it to at most {counts[rarest]}, or "
        "null for the whole split"
    ]


def build_classifier(model_cfg: dict, classes: int, channels: int):
    """A freshly initialised :class:`~raeg_pl.lit.classifier.ClassifierLitModule`."""
    from raeg_pl.lit.classifier import ClassifierLitModule

    return ClassifierLitModule(**{**model_cfg, "num_classes": classes, "in_chans": channels})


def check_forward(net: torch.nn.Module, images: torch.Tensor, classes: int) -> None:
    """Runs ``net`` once on ``images`` (B, C, H, W) in [0, 1]; logits must be (B, classes).

    Raises:
        ValueError: logits of another shape, or not finite.
    """
    with torch.no_grad():
        logits = net.eval()(images)
    if tuple(logits.shape) != (len(images), classes):
        raise ValueError(
            f"logits of shape {tuple(logits.shape)}, expected ({len(images)}, {classes})"
        )
    if not torch.isfinite(logits).all():
        raise ValueError("non-finite logits")


def check_training_step(lit, images: torch.Tensor, labels: torch.Tensor) -> None:
    """Runs one training step's loss of ``lit`` (its adversarial or augmented batch
    included) and its backward pass on ``images`` (B, C, H, W) in [0, 1].

    Raises:
        ValueError: a non-finite loss.
    """
    lit.train()
    lit.log = lambda *a, **k: None  # no Trainer to log to
    loss = lit.training_step((images, labels), 0)
    if not torch.isfinite(loss):
        raise ValueError(f"non-finite training loss {float(loss)}")
    loss.backward()


def check_pirate_data_defense(
    defense, images: torch.Tensor, labels: torch.Tensor, classes: int
) -> None:
    """Applies a pirate defence's data part to a tiny uint8 batch (nothing for the others).

    Class-pattern removal runs as the data module runs it; the learned inverse fits one
    step on the batch as its own leaked pairs and is applied to it.

    Raises:
        ValueError: an output of another shape or dtype than the input.
    """
    from raeg_pl.data.datamodule import apply_defense_uint8
    from raeg_pl.defenses.pirate import learned_inverse_uint8, remove_class_patterns_uint8
    from raeg_pl.utils.quantize import to_uint8

    x = to_uint8(images)
    if defense.kind == "image":
        out = apply_defense_uint8(x, defense.spec)
    elif defense.kind == "labelled":
        out = remove_class_patterns_uint8(x, labels, classes, defense.params["sigma"])
    elif defense.kind == "paired":
        pairs = torch.arange(len(x))
        out, _ = learned_inverse_uint8(x, labels, classes, pairs, x, steps=1)
    else:
        return
    if out.shape != x.shape or out.dtype != torch.uint8:
        raise ValueError(f"output {tuple(out.shape)} {out.dtype}, input {tuple(x.shape)} uint8")


def save_classifier_checkpoint(lit, path: Path) -> Path:
    """Saves a classifier module as a checkpoint :func:`~raeg_pl.lit.protector.load_surrogate` reads."""
    torch.save(
        {
            "state_dict": lit.state_dict(),
            "hyper_parameters": dict(lit.hparams),
            "pytorch-lightning_version": L.__version__,
        },
        path,
    )
    return path


def protector_side(model_cfg: dict) -> int:
    """The side of the check's protector input: the smallest that every level halves twice.

    Any side divisible by ``2 ** levels`` goes through the same layers; the smallest keeps
    the check fast on a busy CPU.
    """
    import inspect

    from raeg_pl.lit.protector import ProtectorLitModule

    default = inspect.signature(ProtectorLitModule).parameters["levels"].default
    return 2 ** (int(model_cfg.get("levels", default)) + 1)


def build_protector(
    model_cfg: dict,
    surrogate_ckpts: list[Path],
    images: torch.Tensor,
    labels: torch.Tensor,
    out: Path,
) -> Path:
    """Builds a row's protector as the protector stage does, runs it both ways, saves it.

    Args:
        model_cfg: the row's merged ``protector.model`` section.
        surrogate_ckpts: checkpoints of the surrogates the row trains against.
        images: (B, C, H, W) float in [0, 1], H and W divisible by ``2 ** levels``; ``C`` is
            the protector's ``in_channels``.
        labels: (B,) int64 class labels (used when the protector is label-conditioned).
        out: where the freshly initialised protector is saved (a checkpoint
            :class:`~raeg_pl.methods.raeg.RAEGMethod` loads).

    Returns:
        ``out``.

    Raises:
        ValueError: the protector changes the images' shape, or produces non-finite values.
    """
    from raeg_pl.lit.protector import ProtectorLitModule

    lit = ProtectorLitModule(
        surrogate_checkpoints=[str(p) for p in surrogate_ckpts],
        in_channels=images.shape[1],
        **model_cfg,
    )
    net = lit.protector.eval()
    cond = labels if net.conditional else None
    with torch.no_grad():
        protected = net(images, cond)
        recovered = net.inverse(protected, cond)
    for what, t in (("protected", protected), ("recovered", recovered)):
        if t.shape != images.shape:
            raise ValueError(
                f"{what} images of shape {tuple(t.shape)}, input {tuple(images.shape)}"
            )
        if not torch.isfinite(t).all():
            raise ValueError(f"non-finite {what} images")
    torch.save(
        {
            "protector_config": net.config,
            "protector_fingerprint": net.fingerprint(),
            "state_dict": {f"protector.{k}": v for k, v in net.state_dict().items()},
        },
        out,
    )
    return out


def check_grid_builds(cfg: dict, say=None) -> list[str]:
    """Builds every surrogate, pirate, row protector and row method of a grid config.

    Args:
        cfg: a grid config (:func:`raeg_pl.config.load_grid_config`), names already valid
            (:func:`raeg_pl.config.validate_grid_config`).
        say: prints a progress line (None: silent).

    Returns:
        One line per part that cannot be built, naming it (``rows.<row>``,
        ``pirates.<arch>``, ``surrogates.<i>``, ``data``, ``inference_per_class``) with the
        error; empty when every part builds.
    """
    from raeg_pl.lit.protector import load_surrogate
    from raeg_pl.methods import create_method

    problems: list[str] = []
    try:
        channels, classes, size = data_geometry(cfg.get("data") or {})
    except Exception as e:  # noqa: BLE001 - reported by name, the grid stops
        return [f"data: {_error(e)}"]
    problems += check_inference_subset(cfg)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, channels, *size, generator=gen)
    labels = torch.arange(2) % classes
    seed = int(cfg.get("seed", 0))
    with tempfile.TemporaryDirectory(prefix="raeg_check_") as tmp:
        tmp_dir = Path(tmp)
        surrogates: list[Path | None] = []
        networks: list[torch.nn.Module | None] = []
        for i, spec in enumerate(cfg.get("surrogates") or []):
            try:
                lit = build_classifier(dict(spec.get("model") or {}), classes, channels)
                check_forward(lit.model, images, classes)
                surrogates.append(save_classifier_checkpoint(lit, tmp_dir / f"surrogate_{i}.ckpt"))
                # As the method stage's surrogates: loaded back from the checkpoint, frozen.
                networks.append(load_surrogate(surrogates[-1]))
            except Exception as e:  # noqa: BLE001 - reported by name
                problems.append(f"surrogates.{i}: cannot be built: {_error(e)}")
                surrogates.append(None)
                networks.append(None)
        defenses = cfg.get("pirate_defenses") or []
        adv = [parse_adv_train(d) or parse_pirate_defense(d).model for d in defenses]
        for name, spec in grid_pirates(cfg).items():
            model_cfg = dict(spec.get("model") or {})
            try:
                check_forward(build_classifier(model_cfg, classes, channels).model, images, classes)
                for extra in filter(None, adv):  # training-loop defences: one training step
                    if "adv_train_eps" in extra:  # one PGD step: more run the same code
                        extra = {**extra, "adv_train_steps": 1}
                    check_training_step(
                        build_classifier({**model_cfg, **extra}, classes, channels), images, labels
                    )
            except Exception as e:  # noqa: BLE001 - reported by name
                problems.append(f"pirates.{name}: cannot be built: {_error(e)}")
        for spec in defenses:
            try:
                check_pirate_data_defense(parse_pirate_defense(spec), images, labels, classes)
            except Exception as e:  # noqa: BLE001 - reported by name
                problems.append(f"pirate_defenses: {spec!r}: cannot be applied: {_error(e)}")
        for row, raw in (cfg.get("rows") or {}).items():
            spec = row_spec(cfg, raw)
            picked = spec.get("surrogates")
            index = [int(i) for i in picked] if picked is not None else range(len(surrogates))
            ckpts = [surrogates[i] for i in index]
            if not ckpts or any(p is None for p in ckpts):
                problems.append(f"rows.{row}: cannot be built: its surrogates cannot be built")
                continue
            params = row_method_params(spec)
            try:
                if params.get("kind") == "raeg":
                    model_cfg = dict(row_protector_spec(cfg, spec).get("model") or {})
                    side = protector_side(model_cfg)
                    small = torch.rand(2, channels, side, side, generator=gen)
                    out = tmp_dir / f"protector_{row}.ckpt"
                    build_protector(model_cfg, ckpts, small, labels, out)
                    params["checkpoint"] = str(out)
                create_method(params, [networks[i] for i in index], device="cpu", seed=seed)
            except Exception as e:  # noqa: BLE001 - reported by name
                problems.append(f"rows.{row}: cannot be built: {_error(e)}")
                continue
            if say is not None:
                say(f"check: row {row} ({params.get('kind')}) builds")
    return problems


__all__ = [
    "GridBuildError",
    "build_classifier",
    "build_protector",
    "check_forward",
    "check_grid_builds",
    "check_inference_subset",
    "check_pirate_data_defense",
    "check_training_step",
    "data_geometry",
    "protector_side",
    "save_classifier_checkpoint",
    "test_class_counts",
]
