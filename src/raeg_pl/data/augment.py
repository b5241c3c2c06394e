"""Batched, on-device training augmentation for image tensors: crop and flip, and UEraser."""

from __future__ import annotations

import torch


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Maps coordinates in (-size, 2 * size - 1) into [0, size) as reflect padding does.

    The edge pixel is not repeated (``F.pad(mode="reflect")``): -1 -> 1, size -> size - 2.
    """
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def random_crop_flip(
    images: torch.Tensor,
    padding: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random crop after reflect padding plus random horizontal flip, per image, on a batch.

    The padded, cropped and flipped pixel of every output position is computed as an index
    into the input, so the whole batch is one gather kernel: no padded copy, no separate
    flip. Any dtype works; on uint8 images it moves a quarter of the bytes of float.

    Args:
        images: (B, C, H, W) images of any dtype (uint8 in [0, 255] or float in [0, 1]).
        padding: pixels of reflect padding on each side before the random crop (0 disables);
            at most min(H, W) - 1.
        flip: flip each image horizontally with probability 1/2.
        generator: optional RNG for reproducibility (must live on ``images.device``).

    Returns:
        (B, C, H, W) augmented images, contiguous, same dtype and device.
    """
    b, c, h, w = images.shape
    if padding <= 0 and not flip:
        return images.contiguous()
    if padding >= min(h, w):
        raise ValueError(f"padding {padding} must be smaller than the image side {min(h, w)}")
    device = images.device
    if padding > 0:
        # Offsets of the crop window inside the padded image, one per image.
        dx = torch.randint(0, 2 * padding + 1, (b,), device=device, generator=generator)
        dy = torch.randint(0, 2 * padding + 1, (b,), device=device, generator=generator)
    else:
        dx = dy = torch.zeros(b, dtype=torch.long, device=device)
    ar_h = torch.arange(h, device=device)
    ar_w = torch.arange(w, device=device)
    cols = ar_w.expand(b, w)
    if flip:
        mask = torch.rand(b, device=device, generator=generator) < 0.5
        cols = torch.where(mask[:, None], (w - 1) - ar_w, cols)
    rows = _reflect(dy[:, None] + ar_h - padding, h)  # (B, H) source rows
    cols = _reflect(dx[:, None] + cols - padding, w)  # (B, W) source columns
    flat = (rows[:, :, None] * w + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return torch.gather(images.reshape(b, c, h * w), 2, flat).view(b, c, h, w)


# ----------------------------------------------------------------------------------------------
# UEraser-style strong augmentation
# ----------------------------------------------------------------------------------------------

_UERASER_OPS = None


def ueraser_ops():
    """The per-image part of :func:`ueraser`: kornia augmentations, built once.

    Each image gets, independently: plasma brightness (roughness 0.1-0.7, intensity 0-1)
    and plasma contrast (roughness 0.1-0.7), always, and a channel shuffle with
    probability 1/2 (UEraser's published policy, Qin et al. 2023); posterisation to 3-8
    bits with probability 1/2 (one of the TrivialAugment operations UEraser draws); random
    erasing of 2-33 % of the image with probability 1/2 (Zhong et al. 2020).
    """
    global _UERASER_OPS
    if _UERASER_OPS is None:
        import kornia.augmentation as K

        _UERASER_OPS = K.AugmentationSequential(
            K.RandomPlasmaBrightness(roughness=(0.1, 0.7), intensity=(0.0, 1.0), p=1.0),
            K.RandomPlasmaContrast(roughness=(0.1, 0.7), p=1.0),
            K.RandomChannelShuffle(p=0.5),
            K.RandomPosterize(bits=3, p=0.5),
            K.RandomErasing(scale=(0.02, 0.33), p=0.5),
        )
    return _UERASER_OPS


def mix_batch(
    images: torch.Tensor,
    targets: torch.Tensor,
    cutmix: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) of a batch with its reversal.

    One mixing weight ``lam ~ Beta(1, 1)`` (uniform, the usual ``alpha = 1``) per batch;
    image ``i`` is mixed with image ``B - 1 - i``. Mixup blends whole images; CutMix pastes
    a box of area about ``1 - lam`` and sets ``lam`` to the area actually kept. Soft
    targets mix with the same weight.

    Args:
        images: (B, C, H, W) float in [0, 1].
        targets: (B, K) float class probabilities (rows sum to 1).
        cutmix: CutMix instead of mixup.
        generator: optional CPU RNG for the weight and the box.

    Returns:
        ``(images, targets)``: (B, C, H, W) float in [0, 1] and (B, K) rows summing to 1.
    """
    lam = float(torch.rand((), generator=generator))
    partner = images.flip(0)
    if cutmix:
        _, _, h, w = images.shape
        cut = (1 - lam) ** 0.5
        ch, cw = int(h * cut), int(w * cut)
        cy = int(torch.randint(h, (1,), generator=generator))
        cx = int(torch.randint(w, (1,), generator=generator))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        images = images.clone()
        images[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        images = lam * images + (1 - lam) * partner
    return images, lam * targets + (1 - lam) * targets.flip(0)


def ueraser(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """UEraser-style strong augmentation of a training batch, with soft labels.

    In the spirit of UEraser-Lite (Qin et al., "Learning the unlearnable: adversarial
    augmentations suppress unlearnable example attacks", 2023: plasma brightness and
    contrast, channel shuffle, TrivialAugment), plus posterisation, random erasing and, per
    batch, mixup or CutMix (one of the two, equally likely, weight ~ Beta(1, 1)): see
    :func:`ueraser_ops` and :func:`mix_batch`. Random draws of the kornia operations come
    from the global RNG of the batch's device (seeded by the fit); ``generator`` seeds the
    choice of mixing and its weight.

    Args:
        images: (B, C, H, W) float in [0, 1] (C = 1 or 3; a shuffle of one channel is a no-op).
        labels: (B,) int64 class labels.
        num_classes: number of classes K.
        generator: optional CPU RNG for the mixing choices.

    Returns:
        ``(images, targets)``: (B, C, H, W) float in [0, 1], same device and dtype, and (B, K)
        float soft labels whose rows sum to 1.
    """
    out = ueraser_ops()(images).clamp(0.0, 1.0).to(images.dtype)
    targets = torch.nn.functional.one_hot(labels.long(), num_classes).to(images.dtype)
    cutmix = bool(torch.rand((), generator=generator) < 0.5)
    return mix_batch(out, targets, cutmix, generator)
