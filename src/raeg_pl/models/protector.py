"""Invertible protector: a Haar-wavelet invertible U-Net (the RAEG generator ``G``).

The generator is a same-size bijection on RGB images in [0, 1] (docs/raeg-method.md, section
2). It is built from three exactly invertible pieces:

* :func:`haar_downsample` / :func:`haar_upsample`: the orthonormal Haar wavelet transform,
  ``(B, C, H, W) <-> (B, 4C, H/2, W/2)``.
* :class:`AffineCoupling`: an affine coupling block that transforms both channel halves with
  a soft-clamped log-scale (Dinh et al., "Density estimation using Real NVP", ICLR 2017;
  soft clamp and zero-initialised sub-networks as in Ardizzone et al., FrEIA / "Guided image
  generation with conditional invertible neural networks", 2019; both-halves update as in
  Jing et al., "HiNet", ICCV 2021).
* :class:`ChannelPermutation`: a fixed, seeded channel shuffle between blocks.

:class:`InvertibleProtector` stacks them into a U-Net shape and handles arbitrary image sizes
while staying an exact bijection (see its docstring for how).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "AffineCoupling",
    "ChannelPermutation",
    "InvertibleProtector",
    "haar_downsample",
    "haar_upsample",
    "label_embedding",
]


def label_embedding(
    embed: nn.Embedding | None,
    labels: torch.Tensor | None,
    x: torch.Tensor,
    num_classes: int,
) -> torch.Tensor | None:
    """The (B, cond_channels, 1, 1) float32 class embedding of a label-conditioned protector.

    Args:
        embed: the protector's embedding table, or None for an unconditioned protector.
        labels: (B,) int class labels in ``[0, num_classes)``; required when ``embed`` is set.
        x: the (B, ...) batch the labels belong to (its size and device are used).
        num_classes: classes of the condition, for the error messages.

    Returns:
        The embedding, or None when ``embed`` is None.

    Raises:
        ValueError: labels are missing, of the wrong count, or out of range.
    """
    if embed is None:
        return None
    if labels is None:
        raise ValueError(
            f"this protector is conditioned on the class label ({num_classes} "
            "classes): pass the images' labels to forward and inverse"
        )
    labels = torch.as_tensor(labels, device=x.device).reshape(-1).long()
    if labels.numel() != x.shape[0]:
        raise ValueError(f"got {labels.numel()} labels for {x.shape[0]} images")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
        )
    return embed(labels).float()[:, :, None, None]


def haar_downsample(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2x2 Haar wavelet analysis.

    Each 2x2 pixel block ``[[a, b], [c, d]]`` of every channel becomes four coefficients
    ``0.5 * H4 @ (a, b, c, d)`` with ``H4`` the 4x4 Hadamard matrix, so the transform is
    orthonormal (energy preserving) and its own inverse up to the layout change.

    Args:
        x: (B, C, H, W) float tensor, H and W even. Any value range.

    Returns:
        (B, 4C, H/2, W/2) tensor, subband-major channel layout
        ``[LL(C), LH(C), HL(C), HH(C)]``: the first C channels are the (scaled, x2) local
        means, the rest are row, column and diagonal details.

    Raises:
        ValueError: if H or W is odd or the input is not 4-D.
    """
    if x.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"Haar downsampling needs even H and W, got {h}x{w}")
    blocks = x.reshape(b, c, h // 2, 2, w // 2, 2)
    x00, x01 = blocks[:, :, :, 0, :, 0], blocks[:, :, :, 0, :, 1]
    x10, x11 = blocks[:, :, :, 1, :, 0], blocks[:, :, :, 1, :, 1]
    ll = (x00 + x01 + x10 + x11) * 0.5
    lh = (x00 + x01 - x10 - x11) * 0.5
    hl = (x00 - x01 + x10 - x11) * 0.5
    hh = (x00 - x01 - x10 + x11) * 0.5
    return torch.cat([ll, lh, hl, hh], dim=1)


def haar_upsample(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2x2 Haar wavelet synthesis, the exact inverse of :func:`haar_downsample`.

    Args:
        y: (B, 4C, H, W) tensor in the subband-major layout ``[LL, LH, HL, HH]``.

    Returns:
        (B, C, 2H, 2W) tensor.

    Raises:
        ValueError: if the channel count is not a multiple of 4 or the input is not 4-D.
    """
    if y.dim() != 4 or y.shape[1] % 4:
        raise ValueError(f"expected a (B, 4C, H, W) tensor, got shape {tuple(y.shape)}")
    b, c4, h, w = y.shape
    ll, lh, hl, hh = y.chunk(4, dim=1)
    # The scaled Hadamard matrix is symmetric and orthogonal, hence its own inverse.
    x00 = (ll + lh + hl + hh) * 0.5
    x01 = (ll + lh - hl - hh) * 0.5
    x10 = (ll - lh + hl - hh) * 0.5
    x11 = (ll - lh - hl + hh) * 0.5
    top = torch.stack([x00, x01], dim=-1)
    bottom = torch.stack([x10, x11], dim=-1)
    return torch.stack([top, bottom], dim=3).reshape(b, c4 // 4, 2 * h, 2 * w)


class _DenseSubnet(nn.Module):
    """Small dense conv block predicting coupling parameters; the identity map's zero at init.

    Three 3x3 convolutions with LeakyReLU, each seeing the block input and all earlier
    features (a 2-layer dense block). The last convolution is zero-initialised, so the block
    outputs exactly zero at construction and every coupling starts as the identity.

    Args:
        in_channels: channels of the conditioning half.
        out_channels: channels produced (2x the transformed half: log-scale and shift).
        hidden_channels: width of the two hidden layers.
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(in_channels + hidden_channels, hidden_channels, 3, padding=1)
        self.conv3 = nn.Conv2d(in_channels + 2 * hidden_channels, out_channels, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)
        nn.init.zeros_(self.conv3.weight)
        nn.init.zeros_(self.conv3.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (B, in_channels, h, w) features to (B, out_channels, h, w) raw parameters."""
        h1 = self.act(self.conv1(x))
        h2 = self.act(self.conv2(torch.cat([x, h1], dim=1)))
        return self.conv3(torch.cat([x, h1, h2], dim=1))


class AffineCoupling(nn.Module):
    """Two-step affine coupling block that updates both channel halves.

    With ``x = (x1, x2)`` split along channels (``x1`` gets ``C // 2`` channels)::

        y2 = x2 * exp(s2(x1)) + t2(x1)
        y1 = x1 * exp(s1(y2)) + t1(y2)

    and log-scales soft-clamped to ``(-clamp, clamp)`` by ``s = clamp * (2 * sigmoid(h) - 1)``
    (Real NVP coupling, Dinh et al. 2017; soft clamp as in FrEIA's ``GLOWCouplingBlock``).
    Zero-initialised sub-networks make the block the identity at construction.

    An optional mask restricts the transform to some spatial positions: where the mask is 0
    the block is the identity, yet the sub-networks still see those positions as context.
    :class:`InvertibleProtector` uses this to stay exactly invertible on padded images.

    With ``cond_channels > 0`` both sub-networks also see a conditioning map (B,
    cond_channels, h, w), the same in :meth:`forward` and :meth:`inverse`, so the block stays
    exactly invertible for a given condition (a conditional coupling as in Ardizzone et al.,
    "Guided image generation with conditional invertible neural networks", 2019).

    Args:
        channels: number of input channels C (at least 2).
        hidden_channels: width of the sub-networks.
        clamp: soft bound on each log-scale; per step the scale lies in
            ``(exp(-clamp), exp(clamp))``.
        cond_channels: channels of the conditioning map (0: unconditioned).
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int = 32,
        clamp: float = 1.0,
        cond_channels: int = 0,
    ) -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"a coupling needs at least 2 channels, got {channels}")
        self.channels = channels
        self.split = channels // 2
        self.clamp = float(clamp)
        self.cond_channels = int(cond_channels)
        c1, c2, cc = self.split, channels - self.split, self.cond_channels
        self.subnet2 = _DenseSubnet(c1 + cc, 2 * c2, hidden_channels)  # sees x1, moves x2
        self.subnet1 = _DenseSubnet(c2 + cc, 2 * c1, hidden_channels)  # sees y2, moves x1

    def _scale_shift(
        self,
        subnet: nn.Module,
        given: torch.Tensor,
        mask: torch.Tensor | None,
        cond: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cond_channels:
            if cond is None or cond.shape[1] != self.cond_channels:
                raise ValueError(
                    f"this coupling is conditioned on {self.cond_channels} channels; "
                    f"got {None if cond is None else tuple(cond.shape)}"
                )
            given = torch.cat([given, cond], dim=1)
        h, t = subnet(given).chunk(2, dim=1)
        s = self.clamp * (2.0 * torch.sigmoid(h) - 1.0)
        if mask is not None:
            s, t = s * mask, t * mask
        return s, t

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Apply the coupling.

        Args:
            x: (B, C, h, w) float tensor.
            mask: optional (1, 1, h, w) tensor of 0/1; positions with 0 are passed through.
            cond: (B, cond_channels, h, w) conditioning map; required iff
                ``cond_channels > 0``.

        Returns:
            (B, C, h, w) tensor.
        """
        return self.forward_log_det(x, mask, cond)[0]

    def forward_log_det(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cond: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` and the log of its Jacobian determinant (natural log), per image.

        The Jacobian is block-triangular with the scales ``exp(s)`` on its diagonal, so
        ``log|det| = sum(s1) + sum(s2)``; masked positions contribute 0.

        Returns:
            ((B, C, h, w) output, (B,) float log-determinant).
        """
        x1, x2 = x[:, : self.split], x[:, self.split :]
        s2, t2 = self._scale_shift(self.subnet2, x1, mask, cond)
        y2 = x2 * torch.exp(s2) + t2
        s1, t1 = self._scale_shift(self.subnet1, y2, mask, cond)
        y1 = x1 * torch.exp(s1) + t1
        return torch.cat([y1, y2], dim=1), s1.flatten(1).sum(1) + s2.flatten(1).sum(1)

    def inverse(
        self, y: torch.Tensor, mask: torch.Tensor | None = None, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Undo :meth:`forward` exactly (up to float rounding).

        Args:
            y: (B, C, h, w) tensor produced by :meth:`forward`.
            mask: the same mask that was given to :meth:`forward`.
            cond: the same conditioning map that was given to :meth:`forward`.

        Returns:
            (B, C, h, w) tensor.
        """
        y1, y2 = y[:, : self.split], y[:, self.split :]
        s1, t1 = self._scale_shift(self.subnet1, y2, mask, cond)
        x1 = (y1 - t1) * torch.exp(-s1)
        s2, t2 = self._scale_shift(self.subnet2, x1, mask, cond)
        x2 = (y2 - t2) * torch.exp(-s2)
        return torch.cat([x1, x2], dim=1)


class ChannelPermutation(nn.Module):
    """Fixed random channel shuffle, deterministic from a seed.

    Couplings only condition one half on the other; shuffling between blocks changes which
    channels share a half, so wavelet subbands and colours mix across the network.

    Args:
        channels: number of channels C.
        seed: seed of the permutation (stored as a buffer, so it is part of the checkpoint
            and of :meth:`InvertibleProtector.fingerprint`).
        invert: use the inverse of the seeded permutation. The protector's up path uses the
            inverses of the down path's shuffles so that the network is the identity at init.
    """

    def __init__(self, channels: int, seed: int, invert: bool = False) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        perm = torch.randperm(channels, generator=generator)
        if invert:
            perm = torch.argsort(perm)
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Shuffle channels of (B, C, h, w) ``x``; positions where ``mask`` is 0 keep order.

        ``cond`` is accepted for a uniform block interface and not used."""
        y = x[:, self.perm]
        return y if mask is None else torch.where(mask.bool(), y, x)

    def inverse(
        self, y: torch.Tensor, mask: torch.Tensor | None = None, cond: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Undo :meth:`forward` exactly."""
        x = y[:, self.inv_perm]
        return x if mask is None else torch.where(mask.bool(), x, y)


class InvertibleProtector(nn.Module):
    """Haar-wavelet invertible U-Net: an exact, same-size bijection on images.

    Architecture (``L = levels``, ``K = blocks_per_level``)::

        down, for l = 1..L:   Haar down, then K x (AffineCoupling, ChannelPermutation)
        up,   for l = L..1:   K x (AffineCoupling, ChannelPermutation), then Haar up

    Channel counts are ``in_channels * 4**l`` at level ``l``; up-path blocks have their own
    parameters, and their permutations are the inverses of the down path's at the same level
    in mirror order (so the shuffles cancel when the couplings are the identity). With zero-initialised sub-networks the whole map is the identity at
    construction (``forward(x) == x`` up to Haar rounding, ~1e-7).

    Image sizes that are not multiples of ``2**levels`` are zero-padded at the bottom/right
    to the next multiple and cropped back afterwards. To keep the cropped map an exact
    bijection, every coupling and permutation is masked: at level ``l`` a position is
    transformed only if its whole ``2**l x 2**l`` pixel footprint lies inside the image;
    other positions pass through unchanged (they still serve as sub-network context). The
    padded region therefore leaves the network exactly as it came in (zeros), so
    :meth:`inverse` can re-create it by zero-padding the protected image. Reflect or
    replicate padding would not work: the padding would be computed from the transformed
    border pixels in the inverse but from the original ones in the forward pass. The price:
    pixels whose 2x2 block straddles the padding (the last row/column of an odd-sized side)
    are never modified, and positions near the padded border skip the coarser levels.
    Sizes that are multiples of ``2**levels`` use no padding and no masks.

    All computation is float32 with autocast disabled, because coupling inverses amplify
    rounding error.

    **Label conditioning** (``num_classes > 0``, a design option beyond the paper): a
    learned embedding of the image's class label, broadcast over the positions of every
    level, is an extra input of every coupling sub-network. The map is then a bijection for
    each label, and both :meth:`forward` and :meth:`inverse` need the label; a dataset owner
    has it when protecting, and an authorised user reads it from the class folder of the
    protected dataset when restoring. The generator can then shape each image's change by
    its class directly instead of inferring the class from the pixels.

    Args:
        in_channels: image channels C (3 for RGB).
        levels: number of Haar levels (2 for 32x32 CIFAR, 3 for larger images).
        blocks_per_level: coupling blocks K per level and per path.
        hidden_channels: width of every coupling sub-network.
        clamp: soft bound on each coupling log-scale.
        num_classes: classes of the label condition (0: unconditioned, the paper's design).
        cond_channels: width of the label embedding (used when ``num_classes > 0``).
    """

    def __init__(
        self,
        in_channels: int = 3,
        levels: int = 2,
        blocks_per_level: int = 4,
        hidden_channels: int = 32,
        clamp: float = 1.0,
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
            "in_channels": int(in_channels),
            "levels": int(levels),
            "blocks_per_level": int(blocks_per_level),
            "hidden_channels": int(hidden_channels),
            "clamp": float(clamp),
        }
        if num_classes:
            # Only conditioned protectors carry these keys, so the configs and fingerprints
            # of unconditioned ones stay what they were.
            self._config |= {"num_classes": int(num_classes), "cond_channels": int(cond_channels)}
        self.in_channels = in_channels
        self.levels = levels
        self.num_classes = int(num_classes)
        cc = int(cond_channels) if num_classes else 0
        self.embed = nn.Embedding(num_classes, cc) if num_classes else None
        self.down = nn.ModuleList()
        self.up = nn.ModuleList()
        for level in range(1, levels + 1):
            channels = in_channels * 4**level
            down, up = nn.ModuleList(), nn.ModuleList()
            for k in range(blocks_per_level):
                down.append(AffineCoupling(channels, hidden_channels, clamp, cc))
                down.append(ChannelPermutation(channels, seed=1000 * level + k))
            # The up path undoes the down path's shuffles in mirror order, so that with
            # identity couplings at init the whole network is the identity.
            for k in reversed(range(blocks_per_level)):
                up.append(AffineCoupling(channels, hidden_channels, clamp, cc))
                up.append(ChannelPermutation(channels, seed=1000 * level + k, invert=True))
            self.down.append(down)
            self.up.append(up)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments; ``InvertibleProtector(**config)`` rebuilds the architecture."""
        return dict(self._config)

    def fingerprint(self) -> str:
        """SHA-256 hex digest of the architecture config and all parameters and buffers.

        Identifies exactly which generator protected a dataset, so a protected copy can be
        matched with the network that inverts it.
        """
        digest = hashlib.sha256()
        digest.update(json.dumps(self._config, sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def _prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Zero-pad to a multiple of ``2**levels`` and build the per-level pass masks."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected a (B, {self.in_channels}, H, W) tensor, got shape {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        mult = 2**self.levels
        pad_h, pad_w = (-h) % mult, (-w) % mult
        if pad_h == 0 and pad_w == 0:
            return x, [None] * self.levels
        x = F.pad(x, (0, pad_w, 0, pad_h))
        invalid = torch.zeros(1, 1, h + pad_h, w + pad_w, device=x.device, dtype=x.dtype)
        invalid[..., h:, :] = 1.0
        invalid[..., :, w:] = 1.0
        # A position at level l is transformed only if none of its pixels is padding.
        masks: list[torch.Tensor | None] = [
            1.0 - F.max_pool2d(invalid, 2**level) for level in range(1, self.levels + 1)
        ]
        return x, masks

    @property
    def conditional(self) -> bool:
        """Whether the map depends on a class label (``num_classes > 0``)."""
        return self.num_classes > 0

    def _condition(self, labels: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor | None:
        """The (B, cond_channels, 1, 1) label embedding (None when unconditioned)."""
        return label_embedding(self.embed, labels, z, self.num_classes)

    @staticmethod
    def _at(cond: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor | None:
        return None if cond is None else cond.expand(-1, -1, *z.shape[-2:])

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Protect images: ``x_p = G(x)`` (``G(x | y)`` when label-conditioned).

        Args:
            x: (B, C, H, W) images, nominally float in [0, 1]; any size and dtype.
            labels: (B,) int class labels; required by a conditioned protector, ignored
                otherwise.

        Returns:
            (B, C, H, W) float32 protected images. Not clamped: values may leave [0, 1]
            slightly; the training loss penalises that and storage quantises them.
        """
        return self.forward_log_det(x, labels)[0]

    def forward_log_det(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` and ``log|det dG/dx|`` per image (natural log).

        Haar transforms are orthonormal and permutations and the untouched padding have
        determinant +-1, so the log-determinant is the sum of the couplings' log-scales. It
        measures how much ``G`` shrinks volume: when it is negative, about
        ``-log2|det| = -log_det / ln 2`` bits of each image are lost when the protected image
        is rounded to 8 bits (the number of 8-bit originals that store to the same protected
        file), which is what a lossless sidecar must carry at the least.

        Returns:
            ((B, C, H, W) protected images as :meth:`forward`, (B,) float32 log-determinant).
        """
        h, w = x.shape[-2:]
        with torch.autocast(device_type=x.device.type, enabled=False):
            z, masks = self._prepare(x.float())
            log_det = z.new_zeros(z.shape[0])
            cond = self._condition(labels, z)
            for stage, mask in zip(self.down, masks):
                z = haar_downsample(z)
                c = self._at(cond, z)
                for block in stage:
                    z, log_det = self._step(block, z, mask, c, log_det)
            for stage, mask in zip(reversed(self.up), reversed(masks)):
                c = self._at(cond, z)
                for block in stage:
                    z, log_det = self._step(block, z, mask, c, log_det)
                z = haar_upsample(z)
        return z[..., :h, :w], log_det

    @staticmethod
    def _step(
        block: nn.Module,
        z: torch.Tensor,
        mask: torch.Tensor | None,
        cond: torch.Tensor | None,
        log_det: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(block, AffineCoupling):
            z, ld = block.forward_log_det(z, mask, cond)
            return z, log_det + ld
        return block(z, mask, cond), log_det

    def inverse(self, y: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Recover images: ``x = G^-1(y)``.

        Exact (~1e-6 in float32) on the float output of :meth:`forward`; on 8-bit stored
        images the error is that of the quantisation, amplified by the network.

        Args:
            y: (B, C, H, W) protected images, any size and dtype.
            labels: (B,) int class labels, the ones given to :meth:`forward`; required by a
                conditioned protector, ignored otherwise.

        Returns:
            (B, C, H, W) float32 recovered images (not clamped).
        """
        h, w = y.shape[-2:]
        with torch.autocast(device_type=y.device.type, enabled=False):
            z, masks = self._prepare(y.float())
            cond = self._condition(labels, z)
            for stage, mask in zip(self.up, masks):
                z = haar_downsample(z)
                c = self._at(cond, z)
                for block in reversed(stage):
                    z = block.inverse(z, mask, c)
            for stage, mask in zip(reversed(self.down), reversed(masks)):
                c = self._at(cond, z)
                for block in reversed(stage):
                    z = block.inverse(z, mask, c)
                z = haar_upsample(z)
        return z[..., :h, :w]
