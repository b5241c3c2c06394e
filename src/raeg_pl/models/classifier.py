"""Classifier factory over timm, with input normalisation inside the model.

Every part of the project works on images in [0, 1]; the classifier owns its normalisation
so that surrogates, pirates and authorised models can be fed protected, recovered or
defended images without anyone remembering per-model statistics.

Small-image variants are registered in timm's own registry (``timm.create_model`` finds
them), for architectures whose timm defaults assume ImageNet-sized inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from timm.models import register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

# CIFAR-10 statistics; the default for the small-image variants below.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _small_image_resnet(
    channels: Sequence[int], layers: Sequence[int], stem_pool: bool, **kwargs
) -> ResNet:
    """A timm ResNet with a 3x3 stride-1 stem for 32x32-class inputs.

    Args:
        channels: widths of the four stages.
        layers: BasicBlocks per stage.
        stem_pool: keep the stride-2 max-pool after the stem (4x cheaper, for CPU budgets).
    """
    in_chans = kwargs.pop("in_chans", 3)
    for key in ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    # A deep stem makes timm size the stem output from stem_width; the stem itself is then
    # replaced by one 3x3 convolution, as in the usual CIFAR ResNets.
    model = ResNet(
        BasicBlock,
        list(layers),
        channels=tuple(channels),
        stem_width=channels[0] // 2,
        stem_type="deep",
        in_chans=in_chans,
        **kwargs,
    )
    model.conv1 = nn.Conv2d(in_chans, channels[0], 3, stride=1, padding=1, bias=False)
    if not stem_pool:
        model.maxpool = nn.Identity()
    model.pretrained_cfg = {
        "input_size": (in_chans, 32, 32),
        "mean": CIFAR_MEAN,
        "std": CIFAR_STD,
        "num_classes": kwargs.get("num_classes", 1000),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "first_conv": "conv1",
        "classifier": "fc",
    }
    return model


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 for 32x32 inputs (3x3 stem, no max-pool): the GPU-profile classifier."""
    return _small_image_resnet((64, 128, 256, 512), (2, 2, 2, 2), stem_pool=False, **kwargs)


@register_model
def resnet_small_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    """One BasicBlock per stage, widths 48-384, stem max-pool: a mid-sized CPU classifier."""
    return _small_image_resnet((48, 96, 192, 384), (1, 1, 1, 1), stem_pool=True, **kwargs)


@register_model
def resnet_tiny_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    """One BasicBlock per stage, widths 32-256, stem max-pool: the CPU-profile classifier."""
    return _small_image_resnet((32, 64, 128, 256), (1, 1, 1, 1), stem_pool=True, **kwargs)


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` as a module, so it travels with the model.

    Args:
        mean: per-channel means (one value per input channel).
        std: per-channel standard deviations.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """A timm network behind its own input normalisation.

    Args:
        backbone: any timm model.
        mean: per-channel means of the normalisation.
        std: per-channel standard deviations.

    Inputs are images ``(B, C, H, W)`` float in [0, 1]; outputs are logits ``(B, classes)``.
    """

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.normalize(x))


def _fit_stats(stats: Sequence[float], in_chans: int) -> tuple[float, ...]:
    stats = tuple(float(s) for s in stats)
    if len(stats) == in_chans:
        return stats
    # A grayscale dataset on a model whose defaults are RGB: use the channel average.
    return (sum(stats) / len(stats),) * in_chans


def create_classifier(
    arch: str,
    num_classes: int,
    in_chans: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    checkpoint_path: str | Path | None = None,
    **timm_kwargs,
) -> Classifier:
    """Creates a timm classifier that takes [0, 1] images.

    Args:
        arch: any ``timm.create_model`` name, including the small-image variants registered
            here (``resnet18_cifar``, ``resnet_small_cifar``, ``resnet_tiny_cifar``).
        num_classes: output classes.
        in_chans: input channels (1 for grayscale datasets).
        mean: normalisation means; default: the model's own data config from timm.
        std: normalisation standard deviations; default as for ``mean``.
        checkpoint_path: optional local weights: a ``Classifier`` state dict, a bare timm
            state dict, or a Lightning checkpoint of ``ClassifierLitModule``.
        **timm_kwargs: forwarded to ``timm.create_model`` (``drop_rate``, ``img_size``...).

    Returns:
        The classifier; weights are random unless ``checkpoint_path`` is given
        (``pretrained`` downloads are never attempted).
    """
    backbone = timm.create_model(
        arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **timm_kwargs
    )
    cfg = timm.data.resolve_model_data_config(backbone)
    mean = _fit_stats(mean if mean is not None else cfg["mean"], in_chans)
    std = _fit_stats(std if std is not None else cfg["std"], in_chans)
    model = Classifier(backbone, mean, std)
    if checkpoint_path is not None:
        load_classifier_weights(model, checkpoint_path)
    return model


def load_classifier_weights(model: Classifier, checkpoint_path: str | Path) -> None:
    """Loads local weights into ``model`` (see ``create_classifier`` for accepted formats)."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: classifier checkpoint not found")
    blob = torch.load(path, map_location="cpu", weights_only=False)
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else blob
    if any(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    if not any(k.startswith("backbone.") for k in state):
        model.backbone.load_state_dict(state)
        return
    model.load_state_dict(state)
