"""Batched, on-device training augmentation for image tensors."""

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
