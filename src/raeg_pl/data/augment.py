"""Batched, on-device training augmentation for image tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(
    images: torch.Tensor,
    padding: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random crop after padding plus random horizontal flip, per image, on a whole batch.

    Args:
        images: (B, C, H, W) float.
        padding: pixels of reflect padding on each side before the random crop (0 disables).
        flip: flip each image horizontally with probability 1/2.
        generator: optional RNG for reproducibility (must live on ``images.device``).

    Returns:
        (B, C, H, W) augmented images, same dtype and device.
    """
    b, _, h, w = images.shape
    out = images
    if padding > 0:
        padded = F.pad(images, (padding,) * 4, mode="reflect")
        dx = torch.randint(0, 2 * padding + 1, (b,), device=images.device, generator=generator)
        dy = torch.randint(0, 2 * padding + 1, (b,), device=images.device, generator=generator)
        rows = dy[:, None] + torch.arange(h, device=images.device)[None, :]  # (B, H)
        cols = dx[:, None] + torch.arange(w, device=images.device)[None, :]  # (B, W)
        idx_b = torch.arange(b, device=images.device)[:, None, None]
        # Advanced indexing gathers each image's own window in one kernel.
        out = padded.permute(0, 2, 3, 1)[idx_b, rows[:, :, None], cols[:, None, :]].permute(
            0, 3, 1, 2
        )
    if flip:
        mask = torch.rand(b, device=images.device, generator=generator) < 0.5
        out = torch.where(mask[:, None, None, None], out.flip(-1), out)
    return out.contiguous()
