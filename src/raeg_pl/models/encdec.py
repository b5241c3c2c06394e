"""Encoder-decoder protector: the non-invertible baseline of the RAEG generator ablation.

The ablation "invertible vs plain encoder/decoder" (docs/raeg-method.md, section 4, item 7)
replaces the Haar-wavelet invertible U-Net of :mod:`raeg_pl.models.protector` by two ordinary
convolutional U-Nets: an encoder that produces the protected image and a separately trained
decoder that recovers the original from the stored one, as in learned image hiding and
watermarking (e.g. Zhu et al., "HiDDeN: hiding data with deep networks", ECCV 2018) and
generator-based adversarial examples (Xiao et al., "Generating adversarial examples with
adversarial networks", IJCAI 2018). Recovery is then learned, never exact, even from the float
output; what invertibility buys is measured by comparing the two under the same objective.

:class:`EncoderDecoderProtector` has the API of :class:`InvertibleProtector` (``forward``,
``inverse``, ``config``, ``fingerprint``), so :class:`raeg_pl.lit.protector.ProtectorLitModule`
trains either; :func:`create_protector` and :func:`protector_from_config` pick the class.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raeg_pl.models.protector import InvertibleProtector, label_embedding

__all__ = [
    "GENERATORS",
    "EncoderDecoderProtector",
    "create_protector",
    "protector_from_config",
]

GENERATORS = ("invertible", "encdec")
"""Names of the protector networks: the invertible U-Net and the encoder-decoder baseline."""


class _ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a skip connection: ``x + conv(act(conv(x)))``, same shape."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, channels, h, w) features to features of the same shape."""
        return x + self.conv2(self.act(self.conv1(x)))


class _ResidualUNet(nn.Module):
    """Plain convolutional U-Net predicting an image residual ``r(x)``; zero at init.

    ``levels`` stride-2 downsamplings, each level with ``blocks_per_level`` residual blocks on
    the way down and on the way up, 2x2 transposed convolutions back up and skip connections
    concatenated at every level. No normalisation layers, so an image's output never depends
    on the other images of its batch, and training and evaluation compute the same function.
    The output convolution is zero-initialised, so ``r`` is exactly zero at construction.

    A label condition, when given, is a (B, cond_channels, 1, 1) embedding broadcast over the
    positions and concatenated to the image at the stem.

    Args:
        in_channels: image channels C.
        widths: feature channels per level, ``widths[0]`` at full resolution, ``levels + 1``
            entries.
        blocks_per_level: residual blocks per level and path.
        cond_channels: channels of the label condition (0: none).
    """

    def __init__(
        self, in_channels: int, widths: list[int], blocks_per_level: int, cond_channels: int = 0
    ) -> None:
        super().__init__()
        levels = len(widths) - 1
        self.act = nn.LeakyReLU(0.2)
        self.stem = nn.Conv2d(in_channels + cond_channels, widths[0], 3, padding=1)
        self.enc = nn.ModuleList(
            nn.Sequential(*[_ResidualBlock(widths[lv]) for _ in range(blocks_per_level)])
            for lv in range(levels)
        )
        self.down = nn.ModuleList(
            nn.Conv2d(widths[lv], widths[lv + 1], 3, stride=2, padding=1) for lv in range(levels)
        )
        self.bottleneck = nn.Sequential(
            *[_ResidualBlock(widths[levels]) for _ in range(blocks_per_level)]
        )
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[lv + 1], widths[lv], 2, stride=2) for lv in range(levels)
        )
        self.fuse = nn.ModuleList(
            nn.Conv2d(2 * widths[lv], widths[lv], 3, padding=1) for lv in range(levels)
        )
        self.dec = nn.ModuleList(
            nn.Sequential(*[_ResidualBlock(widths[lv]) for _ in range(blocks_per_level)])
            for lv in range(levels)
        )
        self.head = nn.Conv2d(widths[0], in_channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Residual (B, C, H, W) of (B, C, H, W) ``x``; H and W multiples of ``2**levels``.

        ``cond``: (B, cond_channels, 1, 1) label embedding, or None when unconditioned.
        """
        if cond is not None:
            x = torch.cat([x, cond.expand(-1, -1, *x.shape[-2:])], dim=1)
        z = self.act(self.stem(x))
        skips = []
        for blocks, down in zip(self.enc, self.down):
            z = blocks(z)
            skips.append(z)
            z = self.act(down(z))
        z = self.bottleneck(z)
        for lv in reversed(range(len(skips))):
            z = self.act(self.up[lv](z))
            z = self.act(self.fuse[lv](torch.cat([z, skips[lv]], dim=1)))
            z = self.dec[lv](z)
        return self.head(z)


class EncoderDecoderProtector(nn.Module):
    """Encoder-decoder protector: a learned, non-invertible stand-in for the RAEG generator.

    ``forward(x) = x + r_enc(x)`` protects and ``inverse(y) = y + r_dec(y)`` recovers, where
    ``r_enc`` and ``r_dec`` are two independent plain convolutional U-Nets (stride-2
    convolutions down, transposed convolutions up, skip connections, residual blocks). Both
    residuals are exactly zero at construction, so like :class:`InvertibleProtector` the
    protector starts as the identity and its "inverse" does too; unlike it, ``inverse``
    recovers ``x`` only as well as the decoder has learned to, even from the float output of
    ``forward``. The recovery term of the RAEG objective, which flows through :meth:`inverse`,
    is what trains the decoder.

    Widths follow the invertible protector: level ``l`` (``l`` stride-2 downsamplings) has
    ``max(hidden_channels, in_channels * 4**l)`` channels, never fewer than the Haar tensor
    the invertible protector carries at that level. With the same ``levels``,
    ``blocks_per_level`` and ``hidden_channels`` the two U-Nets together have about as many
    parameters as the invertible protector (0.93x for the quick protector configuration
    ``(2, 2, 32)``, 1.15x for the paper one ``(2, 4, 64)``, 0.8x to 1.25x over levels 2-3 and
    widths 8-64), but about twice its FLOPs, since they also convolve at full resolution.

    Image sizes that are not multiples of ``2**levels`` are padded at the bottom/right by
    replicating the border and cropped back afterwards; as nothing here has to stay a
    bijection, the padding only needs to look like image content to the convolutions.

    All computation is float32 with autocast disabled, as in :class:`InvertibleProtector`,
    so that the ablation compares architectures at the same numerical precision.

    **Label conditioning** (``num_classes > 0``) mirrors the invertible generator's: a learned
    class embedding is an extra input of both U-Nets, so the ablation row that swaps the
    generator changes nothing else in the recipe. Both :meth:`forward` and :meth:`inverse`
    then need the labels.

    Args:
        in_channels: image channels C (3 for RGB).
        levels: number of stride-2 downsamplings of each U-Net.
        blocks_per_level: residual blocks per level and path of each U-Net.
        hidden_channels: minimum feature width of every level.
        num_classes: classes of the label condition (0: unconditioned).
        cond_channels: width of the label embedding (used when ``num_classes > 0``).
    """

    def __init__(
        self,
        in_channels: int = 3,
        levels: int = 2,
        blocks_per_level: int = 4,
        hidden_channels: int = 32,
        num_classes: int = 0,
        cond_channels: int = 8,
    ) -> None:
        super().__init__()
        if levels < 1 or blocks_per_level < 1 or in_channels < 1 or hidden_channels < 1:
            raise ValueError("in_channels, levels, blocks_per_level, hidden_channels must be >= 1")
        if num_classes < 0 or (num_classes and cond_channels < 1):
            raise ValueError(
                f"need num_classes >= 0 and cond_channels >= 1, got {num_classes}, {cond_channels}"
            )
        self._config: dict[str, Any] = {
            "generator": "encdec",
            "in_channels": int(in_channels),
            "levels": int(levels),
            "blocks_per_level": int(blocks_per_level),
            "hidden_channels": int(hidden_channels),
        }
        if num_classes:
            # As in InvertibleProtector: only conditioned networks carry these keys.
            self._config |= {"num_classes": int(num_classes), "cond_channels": int(cond_channels)}
        self.in_channels = in_channels
        self.levels = levels
        self.num_classes = int(num_classes)
        cc = int(cond_channels) if num_classes else 0
        # One embedding per U-Net: the decoder must not rely on the encoder's parameters.
        self.embed_enc = nn.Embedding(num_classes, cc) if num_classes else None
        self.embed_dec = nn.Embedding(num_classes, cc) if num_classes else None
        widths = [max(hidden_channels, in_channels * 4**lv) for lv in range(levels + 1)]
        self.encoder = _ResidualUNet(in_channels, widths, blocks_per_level, cc)
        self.decoder = _ResidualUNet(in_channels, widths, blocks_per_level, cc)

    @property
    def config(self) -> dict[str, Any]:
        """Architecture, with ``"generator": "encdec"``; :func:`protector_from_config` rebuilds it."""
        return dict(self._config)

    def fingerprint(self) -> str:
        """SHA-256 hex digest of the architecture config and all parameters and buffers.

        Same scheme as :meth:`InvertibleProtector.fingerprint`; the ``"generator"`` entry of
        the config keeps the digests of the two kinds of network apart.
        """
        digest = hashlib.sha256()
        digest.update(json.dumps(self._config, sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    @property
    def conditional(self) -> bool:
        """Whether the map depends on a class label (``num_classes > 0``)."""
        return self.num_classes > 0

    def _apply_residual(
        self,
        net: _ResidualUNet,
        embed: nn.Embedding | None,
        x: torch.Tensor,
        labels: torch.Tensor | None,
    ) -> torch.Tensor:
        """``x + net(x | y)`` on (B, C, H, W) ``x`` of any size, in float32."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected a (B, {self.in_channels}, H, W) tensor, got shape {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        mult = 2**self.levels
        pad_h, pad_w = (-h) % mult, (-w) % mult
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            cond = label_embedding(embed, labels, x, self.num_classes)
            padded = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate") if pad_h or pad_w else x
            return x + net(padded, cond)[..., :h, :w]

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Protect images with the encoder: ``x_p = x + r_enc(x)``.

        Args:
            x: (B, C, H, W) images, nominally float in [0, 1]; any size and dtype.
            labels: (B,) int class labels; required by a conditioned protector, ignored
                otherwise.

        Returns:
            (B, C, H, W) float32 protected images. Not clamped: values may leave [0, 1]
            slightly; the training loss penalises that and storage quantises them.
        """
        return self._apply_residual(self.encoder, self.embed_enc, x, labels)

    def inverse(self, y: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Recover images with the decoder: ``x_r = y + r_dec(y)``.

        Approximate: only as good as the decoder has been trained to be, on stored 8-bit
        images and on the float output of :meth:`forward` alike (the identity at init).

        Args:
            y: (B, C, H, W) protected images, any size and dtype.
            labels: (B,) int class labels, the ones given to :meth:`forward`; required by a
                conditioned protector, ignored otherwise.

        Returns:
            (B, C, H, W) float32 recovered images (not clamped).
        """
        return self._apply_residual(self.decoder, self.embed_dec, y, labels)


def create_protector(
    generator: str = "invertible",
    in_channels: int = 3,
    levels: int = 2,
    blocks_per_level: int = 4,
    hidden_channels: int = 32,
    clamp: float = 1.0,
    num_classes: int = 0,
    cond_channels: int = 8,
) -> InvertibleProtector | EncoderDecoderProtector:
    """The protector network of a generator kind, freshly initialised (the identity).

    Args:
        generator: ``"invertible"`` (:class:`InvertibleProtector`) or ``"encdec"``
            (:class:`EncoderDecoderProtector`).
        in_channels: image channels.
        levels: Haar levels, or stride-2 downsamplings of the encoder-decoder.
        blocks_per_level: coupling blocks, or residual blocks, per level and path.
        hidden_channels: width of the coupling sub-networks, or minimum U-Net width.
        clamp: soft clamp of the coupling log-scales; the encoder-decoder has none and
            ignores it.
        num_classes: label conditioning (0: none).
        cond_channels: width of the label embedding.

    Raises:
        ValueError: ``generator`` is not one of :data:`GENERATORS`.
    """
    if generator == "invertible":
        return InvertibleProtector(
            in_channels,
            levels,
            blocks_per_level,
            hidden_channels,
            clamp,
            num_classes,
            cond_channels,
        )
    if generator == "encdec":
        return EncoderDecoderProtector(
            in_channels, levels, blocks_per_level, hidden_channels, num_classes, cond_channels
        )
    raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}")


def protector_from_config(
    config: Mapping[str, Any],
) -> InvertibleProtector | EncoderDecoderProtector:
    """Rebuilds the architecture a protector's ``config`` describes (weights not loaded).

    Args:
        config: ``net.config`` of either protector. The ``"generator"`` entry picks the class;
            a config without one is an :class:`InvertibleProtector`'s, whose config never
            carries the entry (checkpoints and key files written before the encoder-decoder
            existed included).

    Raises:
        ValueError: an unknown ``"generator"``.
        TypeError: the remaining entries are not that class's constructor arguments.
    """
    kwargs = dict(config)
    generator = kwargs.pop("generator", "invertible")
    if generator == "invertible":
        return InvertibleProtector(**kwargs)
    if generator == "encdec":
        return EncoderDecoderProtector(**kwargs)
    raise ValueError(f"unknown protector generator {generator!r}; expected one of {GENERATORS}")
