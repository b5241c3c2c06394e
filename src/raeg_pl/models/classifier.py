"""Classifier factory over timm, with input normalisation inside the model.

Every part of the project works on images in [0, 1]; the classifier owns its normalisation
so that surrogates, pirates and authorised models can be fed protected, recovered or
defended images without anyone remembering per-model statistics.

Small-image variants are registered in timm's own registry (``timm.create_model`` finds
them), for architectures whose timm defaults assume ImageNet-sized inputs:

| family | GPU (paper) size | CPU size |
|---|---|---|
| ResNet | ``resnet18_cifar`` | ``resnet_small_cifar``, ``resnet_tiny_cifar`` |
| VGG (BatchNorm) | ``vgg11_cifar`` | ``vgg_tiny_cifar`` |
| MobileNet-V2 | ``mobilenetv2_cifar`` | ``mobilenet_tiny_cifar`` |
| ViT (4x4 patches) | ``vit_tiny_cifar`` | ``vit_micro_cifar`` |
| fast ResNet-9 | ``resnet_fast_cifar`` | ``resnet_fast_tiny_cifar`` |
| airbench (whitened ResNet) | ``resnet_air_cifar`` | ``resnet_air_small_cifar`` |

All take 32x32 inputs (any ``in_chans``, ``num_classes``) and build without downloads.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead
from timm.models import register_model
from timm.models._efficientnet_builder import decode_arch_def, round_channels
from timm.models.efficientnet import EfficientNet
from timm.models.resnet import BasicBlock, ResNet
from timm.models.vgg import VGG
from timm.models.vision_transformer import VisionTransformer
from torch import nn

# CIFAR-10 statistics; the default for the small-image variants below.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


_PRETRAINED_KEYS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _drop_pretrained_kwargs(kwargs: dict) -> dict:
    """``kwargs`` without the pretrained-weight arguments ``timm.create_model`` may pass."""
    return {k: v for k, v in kwargs.items() if k not in _PRETRAINED_KEYS}


def _small_image_cfg(in_chans: int, num_classes: int, first_conv: str, classifier: str) -> dict:
    """timm's data config of a 32x32 model: CIFAR statistics, no resize or crop."""
    return {
        "input_size": (in_chans, 32, 32),
        "mean": CIFAR_MEAN,
        "std": CIFAR_STD,
        "num_classes": num_classes,
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "first_conv": first_conv,
        "classifier": classifier,
    }


def _small_image_resnet(
    channels: Sequence[int], layers: Sequence[int], stem_pool: bool, **kwargs
) -> ResNet:
    """A timm ResNet with a 3x3 stride-1 stem for 32x32-class inputs.

    Args:
        channels: widths of the four stages.
        layers: BasicBlocks per stage.
        stem_pool: keep the stride-2 max-pool after the stem (4x cheaper, for CPU budgets).
    """
    kwargs = _drop_pretrained_kwargs(kwargs)
    in_chans = kwargs.pop("in_chans", 3)
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
    model.pretrained_cfg = _small_image_cfg(
        in_chans, kwargs.get("num_classes", 1000), "conv1", "fc"
    )
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


# --------------------------------------------------------------------------- pirates
# Further 32x32 architectures for the pirate table: a VGG, a MobileNet, a ViT and a fast
# small ResNet, each at paper size (GPU) and at a CPU size that trains 10 epochs on 10,000
# images in about a minute on 2 cores (bf16). All are built from timm's own classes except
# the fast ResNet, which timm does not have.

# timm's VGG always builds its ImageNet head (a 7x7 conv to 4096 channels, ~100M weights)
# before it is replaced; this ratio shrinks that throwaway head to one hidden channel.
_VGG_THROWAWAY_MLP_RATIO = 1 / 4096


def _small_image_vgg(cfg: Sequence[int | str], **kwargs) -> VGG:
    """A timm VGG with BatchNorm and a global-pool + linear head, for 32x32 inputs.

    The max-pools leave 1x1 (VGG-11) or 2x2 feature maps of 32x32 inputs, so the ImageNet
    head (a 4096-wide 7x7 conv MLP) is replaced by the usual CIFAR head: global average
    pooling and one linear layer.

    Args:
        cfg: widths of the 3x3 conv-BN-ReLU layers, ``"M"`` for a 2x2 max-pool.
    """
    kwargs = _drop_pretrained_kwargs(kwargs)
    in_chans = kwargs.pop("in_chans", 3)
    num_classes = kwargs.pop("num_classes", 1000)
    drop_rate = kwargs.pop("drop_rate", 0.0)
    model = VGG(
        list(cfg),
        num_classes=num_classes,
        in_chans=in_chans,
        norm_layer=nn.BatchNorm2d,
        mlp_ratio=_VGG_THROWAWAY_MLP_RATIO,
        drop_rate=drop_rate,
        **kwargs,
    )
    model.pre_logits = nn.Identity()
    model.head = ClassifierHead(model.num_features, num_classes, "avg", drop_rate=drop_rate)
    model.head_hidden_size = model.num_features
    if num_classes > 0:
        # VGG's own initialisation of its linear layers.
        nn.init.normal_(model.head.fc.weight, 0, 0.01)
        nn.init.zeros_(model.head.fc.bias)
    model.pretrained_cfg = _small_image_cfg(in_chans, num_classes, "features.0", "head.fc")
    return model


@register_model
def vgg11_cifar(pretrained: bool = False, **kwargs) -> VGG:
    """VGG-11 with BatchNorm for 32x32 inputs (global pool + linear head): a GPU pirate."""
    return _small_image_vgg(
        [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"], **kwargs
    )


@register_model
def vgg_tiny_cifar(pretrained: bool = False, **kwargs) -> VGG:
    """A six-conv VGG with BatchNorm, widths 32-256, for 32x32 inputs: a CPU pirate."""
    return _small_image_vgg([32, "M", 64, "M", 128, 128, "M", 256, 256, "M"], **kwargs)


# MobileNet-V2 (Sandler et al., CVPR 2018) in timm's block notation. On 32x32 inputs the
# stem and the first stride-2 stage run at stride 1 (as in the common CIFAR MobileNet-V2),
# so the last stage still sees 4x4 features instead of 1x1.
_MOBILENETV2_CIFAR = (
    ("ds_r1_k3_s1_c16",),
    ("ir_r2_k3_s1_e6_c24",),
    ("ir_r3_k3_s2_e6_c32",),
    ("ir_r4_k3_s2_e6_c64",),
    ("ir_r3_k3_s1_e6_c96",),
    ("ir_r3_k3_s2_e6_c160",),
    ("ir_r1_k3_s1_e6_c320",),
)


def _small_image_mobilenetv2(
    stem_stride: int,
    channel_multiplier: float,
    depth_multiplier: float,
    num_features: int,
    **kwargs,
) -> EfficientNet:
    """A timm MobileNet-V2 (EfficientNet class, ReLU6, BatchNorm) for 32x32 inputs.

    Args:
        stem_stride: stride of the 3x3 stem (ImageNet: 2; 1 keeps full 32x32 resolution).
        channel_multiplier: width multiplier of every stage (rounded to multiples of 8).
        depth_multiplier: multiplier of the blocks per stage (rounded up).
        num_features: width of the 1x1 conv before global pooling.
    """
    kwargs = _drop_pretrained_kwargs(kwargs)
    in_chans = kwargs.pop("in_chans", 3)
    num_classes = kwargs.pop("num_classes", 1000)
    model = EfficientNet(
        block_args=decode_arch_def(
            [list(stage) for stage in _MOBILENETV2_CIFAR], depth_multiplier=depth_multiplier
        ),
        num_classes=num_classes,
        num_features=num_features,
        in_chans=in_chans,
        stem_size=32,
        round_chs_fn=partial(round_channels, multiplier=channel_multiplier),
        act_layer=nn.ReLU6,
        norm_layer=nn.BatchNorm2d,
        **kwargs,
    )
    # timm's stem is always stride 2; a plain 3x3 conv with padding 1 keeps its output
    # size rule at stride 1, so only the stride changes (timm's initialisation is kept).
    if not isinstance(model.conv_stem, nn.Conv2d) or model.conv_stem.padding != (1, 1):
        raise TypeError(f"unexpected MobileNet stem {model.conv_stem}")
    model.conv_stem.stride = (stem_stride, stem_stride)
    model.pretrained_cfg = _small_image_cfg(in_chans, num_classes, "conv_stem", "classifier")
    return model


@register_model
def mobilenetv2_cifar(pretrained: bool = False, **kwargs) -> EfficientNet:
    """MobileNet-V2 (width 1.0, 1280 features) with stride-1 stem and first stage: a GPU pirate."""
    return _small_image_mobilenetv2(1, 1.0, 1.0, 1280, **kwargs)


@register_model
def mobilenet_tiny_cifar(pretrained: bool = False, **kwargs) -> EfficientNet:
    """MobileNet-V2 at width 0.35, half depth, stride-2 stem, 512 features: a CPU pirate.

    Depthwise convolutions are slow per operation on CPUs, so this variant is narrow and
    starts at 16x16 to stay within the CPU budget of the other small pirates.
    """
    return _small_image_mobilenetv2(2, 0.35, 0.5, 512, **kwargs)


def _small_image_vit(
    embed_dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float = 4.0,
    fused_attn: bool | None = None,
    **kwargs,
) -> VisionTransformer:
    """A timm VisionTransformer on 4x4 patches of 32x32 images (64 tokens + class token).

    Args:
        embed_dim: token width.
        depth: transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: hidden width of the block MLPs over ``embed_dim``.
        fused_attn: force (True) or avoid (False) ``scaled_dot_product_attention``; None
            keeps timm's default.
    """
    kwargs = _drop_pretrained_kwargs(kwargs)
    in_chans = kwargs.pop("in_chans", 3)
    num_classes = kwargs.pop("num_classes", 1000)
    kwargs.setdefault("img_size", 32)
    kwargs.setdefault("patch_size", 4)
    model = VisionTransformer(
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        in_chans=in_chans,
        num_classes=num_classes,
        **kwargs,
    )
    if fused_attn is not None:
        for block in model.blocks:
            block.attn.fused_attn = fused_attn
    model.pretrained_cfg = _small_image_cfg(in_chans, num_classes, "patch_embed.proj", "head")
    return model


@register_model
def vit_tiny_cifar(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Tiny (width 192, 12 blocks, 3 heads) on 4x4 patches of 32x32 images: a GPU pirate."""
    return _small_image_vit(192, 12, 3, **kwargs)


@register_model
def vit_micro_cifar(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A 4-block ViT (width 96, 3 heads, MLP ratio 2) on 4x4 patches of 32x32: a CPU pirate.

    Attention is computed with plain matmuls: for 65 tokens the CPU flash-attention
    kernel's backward pass is about twice as slow as the unfused one.
    """
    return _small_image_vit(96, 4, 3, mlp_ratio=2.0, fused_attn=False, **kwargs)


class ConvBNAct(nn.Sequential):
    """3x3 convolution (no bias), BatchNorm, activation: the unit of the fast ResNets.

    Args:
        in_chs: input channels.
        out_chs: output channels.
        act_layer: activation class.
    """

    def __init__(self, in_chs: int, out_chs: int, act_layer: type[nn.Module] = nn.ReLU) -> None:
        super().__init__(
            nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_chs),
            act_layer(inplace=True),
        )


class ResidualPair(nn.Module):
    """``x + f(g(x))`` for two width-preserving :class:`ConvBNAct` layers ``g``, ``f``."""

    def __init__(self, chs: int, act_layer: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(chs, chs, act_layer)
        self.conv2 = ConvBNAct(chs, chs, act_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


class LinearHead:
    """timm's classifier interface for a network whose head is one bias-free linear layer
    ``fc`` on ``num_features`` pooled features (the pooling stays what the network uses)."""

    num_features: int
    num_classes: int
    fc: nn.Module

    def _make_fc(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        return nn.Linear(self.num_features, num_classes, bias=False)

    def get_classifier(self) -> nn.Module:
        """The final linear layer (timm's interface)."""
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replaces the final linear layer (timm's interface; the pooling is kept)."""
        self.num_classes = num_classes
        self.fc = self._make_fc(num_classes)


class FastResNet(LinearHead, nn.Module):
    """The fast 9-layer CIFAR ResNet of the training-speed records (Page's ResNet-9).

    D. Page, "How to train your ResNet" (2018; DAWNBench CIFAR-10 record), the basis of the
    later airbench recipes (K. Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU",
    2024): a conv-BN-activation stem, then per stage one conv-BN-activation that widens, a
    2x2 max-pool, and (in the first and last stage) a residual pair of conv-BN-activation
    layers; a global max-pool and a bias-free linear layer whose logits are scaled down.

    Args:
        widths: stem width, then one width per stage (each stage halves the resolution).
        residual_stages: indices of the stages that end with a residual pair.
        num_classes: output classes (0: the pooled features are returned).
        in_chans: input channels.
        act_layer: activation class.
        logit_scale: factor on the logits (Page's 0.125 keeps early logits small).
        drop_rate: dropout before the linear layer.

    Inputs are (B, in_chans, H, W) normalised images with H, W divisible by
    ``2 ** (len(widths) - 1)``; outputs (B, num_classes) logits.
    """

    def __init__(
        self,
        widths: Sequence[int] = (64, 128, 256, 512),
        residual_stages: Sequence[int] = (0, 2),
        num_classes: int = 1000,
        in_chans: int = 3,
        act_layer: type[nn.Module] = nn.ReLU,
        logit_scale: float = 0.125,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.logit_scale = logit_scale
        self.stem = ConvBNAct(in_chans, widths[0], act_layer)
        stages = []
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers = [ConvBNAct(w_in, w_out, act_layer), nn.MaxPool2d(2)]
            if i in residual_stages:
                layers.append(ResidualPair(w_out, act_layer))
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = widths[-1]
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = self._make_fc(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps (B, num_features, H / 2**stages, W / 2**stages)."""
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled features (B, num_features) if ``pre_logits``, else logits (B, num_classes)."""
        x = self.drop(self.pool(x).flatten(1))
        if pre_logits or self.num_classes <= 0:
            return x
        return self.fc(x) * self.logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _fast_resnet(widths: Sequence[int], **kwargs) -> FastResNet:
    kwargs = _drop_pretrained_kwargs(kwargs)
    model = FastResNet(widths, **kwargs)
    model.pretrained_cfg = _small_image_cfg(model.in_chans, model.num_classes, "stem.0", "fc")
    return model


@register_model
def resnet_fast_cifar(pretrained: bool = False, **kwargs) -> FastResNet:
    """Page's ResNet-9 (widths 64-128-256-512, residual pairs in stages 1 and 3): a GPU pirate."""
    return _fast_resnet((64, 128, 256, 512), **kwargs)


@register_model
def resnet_fast_tiny_cifar(pretrained: bool = False, **kwargs) -> FastResNet:
    """Page's ResNet-9 at a quarter of the width (16-32-64-128): a CPU pirate."""
    return _fast_resnet((16, 32, 64, 128), **kwargs)


class WhiteningConv(nn.Module):
    """A fixed 2x2 patch-whitening convolution: the stem of airbench (Jordan, 2024).

    Its ``2 * in_chans * 4`` filters are the eigenvectors of the covariance of the 2x2
    input patches, each scaled by ``1 / sqrt(eigenvalue + eps)``, and their negatives (so a
    following activation keeps both signs). They are computed from the inputs of the first
    forward pass (in training, one augmented batch: a few hundred thousand patches fix the
    12x12 covariance), so the model needs no separate data pass. The filters are a buffer,
    not a parameter: they never train, checkpoints carry them, and DDP broadcasts rank 0's
    to every rank; the bias trains.

    Args:
        in_chans: input channels.
        eps: added to the eigenvalues (airbench's 5e-4).

    Inputs (B, in_chans, H, W) normalised images; outputs (B, 8 * in_chans, H - 1, W - 1).
    """

    def __init__(self, in_chans: int, eps: float = 5e-4) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.out_channels = 2 * in_chans * 4
        self.eps = eps
        self.register_buffer("weight", torch.zeros(self.out_channels, in_chans, 2, 2))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.bias = nn.Parameter(torch.zeros(self.out_channels))

    @torch.no_grad()
    def init_whitening(self, x: torch.Tensor) -> None:
        """Sets the filters from the 2x2 patches of ``x`` (B, in_chans, H, W)."""
        c = x.shape[1]
        patches = x.double().unfold(2, 2, 1).unfold(3, 2, 1)  # (B, C, H-1, W-1, 2, 2)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * 4)
        patches = patches - patches.mean(0)
        # In float64 and outside autocast: a bf16 product is not positive semi-definite.
        with torch.autocast(x.device.type, enabled=False):
            cov = patches.T @ patches / patches.shape[0]
        eigenvalues, eigenvectors = torch.linalg.eigh(cov)
        eigenvalues = eigenvalues.clamp(min=0)
        filters = (eigenvectors.T / (eigenvalues[:, None] + self.eps).sqrt()).float()
        filters = filters.flip(0).reshape(c * 4, c, 2, 2)  # largest eigenvalue first
        self.weight.copy_(torch.cat([filters, -filters]))
        self.initialised.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialised:
            self.init_whitening(x)
        return F.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class FastBatchNorm(nn.BatchNorm2d):
    """BatchNorm with airbench's options: fixed unit scale, fast statistics, scaled bias.

    Args:
        num_features: channels.
        momentum: PyTorch's running-average momentum (airbench: 0.4, i.e. fast).
        eps: variance epsilon (airbench: 1e-12).
        affine_weight: learn the per-channel scale (airbench keeps it at 1).
        bias_scale: the bias is ``bias_scale * b`` for a learned ``b``: with SGD this
            multiplies the bias's effective learning rate by ``bias_scale ** 2`` (airbench
            trains BatchNorm biases at 64x the learning rate: ``bias_scale`` 8) without an
            optimiser parameter group.
    """

    def __init__(
        self,
        num_features: int,
        momentum: float = 0.4,
        eps: float = 1e-12,
        affine_weight: bool = False,
        bias_scale: float = 1.0,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.weight.requires_grad_(affine_weight)
        self.bias_scale = bias_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch = self.training
        if use_batch:
            self.num_batches_tracked.add_(1)
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias * self.bias_scale,
            use_batch,
            self.momentum,
            self.eps,
        )


class AirBlock(nn.Sequential):
    """conv3x3 -> max-pool 2 -> BN -> act -> conv3x3 -> BN -> act (airbench's block).

    Pooling right after the first convolution runs its BatchNorm, activation and the second
    convolution at a quarter of the pixels.
    """

    def __init__(self, in_chs: int, out_chs: int, bn: partial, act_layer: type[nn.Module]):
        super().__init__(
            nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False),
            nn.MaxPool2d(2),
            bn(out_chs),
            act_layer(),
            nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False),
            bn(out_chs),
            act_layer(),
        )


class AirResNet(LinearHead, nn.Module):
    """The airbench CIFAR-10 network (K. Jordan, "94% on CIFAR-10 in 3.29 seconds on a
    single GPU", 2024), a descendant of Page's ResNet-9 tuned for accuracy per FLOP.

    A frozen 2x2 whitening stem (:class:`WhiteningConv`) and GELU, then three blocks of
    conv-pool-BN-GELU-conv-BN-GELU (:class:`AirBlock`), a 3x3 max-pool, a bias-free linear
    layer with logits scaled by ``logit_scale``. Options (each one of airbench's, each can be
    switched off for ablations): identity (Dirac) initialisation of the convolutions' first
    ``min(in_chs, out_chs)`` filters, BatchNorms with fixed scale, fast statistics and a bias learning-rate
    multiplier (:class:`FastBatchNorm`).

    Args:
        widths: output widths of the three blocks (airbench: 64, 256, 256).
        num_classes: output classes (0: the pooled features are returned).
        in_chans: input channels.
        whiten: the whitening stem (False: a trained 3x3 conv-BN-GELU stem of the same width).
        dirac: identity initialisation of the 3x3 convolutions.
        bn_momentum: PyTorch momentum of the BatchNorm running averages.
        bn_bias_scale: see :class:`FastBatchNorm` (8: 64x bias learning rate).
        bn_weight: learn BatchNorm scales.
        logit_scale: factor on the logits (airbench: 1/9).
        act_layer: activation class.

    Inputs (B, in_chans, 32, 32) normalised images (any size >= 24 works); outputs
    (B, num_classes) logits.
    """

    def __init__(
        self,
        widths: Sequence[int] = (64, 256, 256),
        num_classes: int = 1000,
        in_chans: int = 3,
        whiten: bool = True,
        dirac: bool = True,
        bn_momentum: float = 0.4,
        bn_bias_scale: float = 8.0,
        bn_weight: bool = False,
        logit_scale: float = 1 / 9,
        act_layer: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"AirResNet takes three block widths, got {tuple(widths)}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.logit_scale = logit_scale
        bn = partial(
            FastBatchNorm, momentum=bn_momentum, affine_weight=bn_weight, bias_scale=bn_bias_scale
        )
        stem_width = 2 * in_chans * 4
        if whiten:
            self.stem = nn.Sequential(WhiteningConv(in_chans), act_layer())
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, stem_width, 3, padding=1, bias=False),
                bn(stem_width),
                act_layer(),
            )
        chans = [stem_width, *widths]
        self.blocks = nn.Sequential(
            *(AirBlock(a, b, bn, act_layer) for a, b in zip(chans[:-1], chans[1:]))
        )
        self.pool = nn.Sequential(nn.MaxPool2d(3), nn.AdaptiveMaxPool2d(1))
        self.num_features = self.head_hidden_size = widths[-1]
        self.fc = self._make_fc(num_classes)
        if dirac:
            for m in self.blocks.modules():
                if isinstance(m, nn.Conv2d):
                    # Each conv starts as the identity on its first min(in, out) outputs
                    # (the rest keep PyTorch's default init), so a deep stack starts near
                    # shallow.
                    torch.nn.init.dirac_(m.weight.data[: m.in_channels])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature maps (B, widths[-1], H', W') after the third block."""
        return self.blocks(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled features (B, num_features) if ``pre_logits``, else logits (B, num_classes)."""
        x = self.pool(x).flatten(1)
        if pre_logits or self.num_classes <= 0:
            return x
        return self.fc(x) * self.logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _air_resnet(widths: Sequence[int], **kwargs) -> AirResNet:
    kwargs = _drop_pretrained_kwargs(kwargs)
    model = AirResNet(widths, **kwargs)
    model.pretrained_cfg = _small_image_cfg(model.in_chans, model.num_classes, "stem.0", "fc")
    return model


@register_model
def resnet_air_cifar(pretrained: bool = False, **kwargs) -> AirResNet:
    """The airbench94 network (whitening stem, blocks 64-256-256): a GPU pirate."""
    return _air_resnet((64, 256, 256), **kwargs)


@register_model
def resnet_air_small_cifar(pretrained: bool = False, **kwargs) -> AirResNet:
    """The airbench network at blocks 32-128-128 (~1/4 of its FLOPs): a CPU pirate."""
    return _air_resnet((32, 128, 128), **kwargs)


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
            here (``resnet18_cifar``, ``resnet_tiny_cifar``, ``vgg11_cifar``,
            ``vit_micro_cifar``... see the module docstring).
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
