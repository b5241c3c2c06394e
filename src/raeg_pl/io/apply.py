"""Applying a protector to 8-bit images: the one implementation every caller shares.

The pipeline's exports, the RAEG method and the owner commands all protect (and restore)
uint8 images through :func:`apply_protector`, so the 8-bit storage step, label
conditioning, tiling of large images and the float settings that make a restore
reproducible are decided in one place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from raeg_pl.utils.quantize import from_uint8, to_uint8

__all__ = ["apply_protector", "exact_math", "protector_values"]

Labels = torch.Tensor | np.ndarray | Sequence[int] | None


@contextlib.contextmanager
def exact_math() -> Iterator[None]:
    """No autograd and no TF32 on CUDA while inside.

    Reduced-precision matmuls would make restores device-dependent, and the lossless
    sidecar relies on protect and restore computing the same float values.
    """
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _network(net: Any, inverse: bool) -> tuple[Callable[..., torch.Tensor], bool, torch.device]:
    """(the function to run, whether it takes labels, the network's device)."""
    owner = getattr(net, "__self__", net)  # a bound ``net.forward`` / ``net.inverse`` works too
    fn = owner.inverse if inverse else net
    conditional = bool(getattr(owner, "conditional", False))
    device = torch.device("cpu")
    if isinstance(owner, torch.nn.Module):
        first = next(owner.parameters(), None)
        if first is not None:
            device = first.device
    return fn, conditional, device


def _run(
    net: Any,
    images_u8: torch.Tensor | np.ndarray,
    labels: Labels,
    inverse: bool,
    tile: int,
    batch_size: int | None,
    device: str | torch.device | None,
    finish: Callable[[torch.Tensor], torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    fn, conditional, net_device = _network(net, inverse)
    if isinstance(images_u8, np.ndarray) and not images_u8.flags.writeable:
        images_u8 = images_u8.copy()  # torch warns on read-only arrays
    images = torch.as_tensor(images_u8)
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(
            f"expected (B, C, H, W) uint8 images, got {images.dtype} {tuple(images.shape)}"
        )
    if tile < 0:
        raise ValueError(f"tile must be >= 0, got {tile}")
    dev = torch.device(device) if device is not None else net_device
    n = images.shape[0]
    y_all = None
    if conditional:
        if labels is None:
            raise ValueError(
                "this protector is conditioned on class labels: pass each image's label"
            )
        y_all = torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels)
        y_all = y_all.reshape(-1).long()
        if y_all.numel() != n:
            raise ValueError(f"got {y_all.numel()} labels for {n} images")
    step = n if not batch_size else max(1, int(batch_size))
    out = torch.empty(images.shape, dtype=out_dtype)
    h, w = images.shape[-2:]
    with exact_math():
        for start in range(0, n, max(step, 1)):
            x = from_uint8(images[start : start + step].to(dev))
            y = None if y_all is None else y_all[start : start + step].to(dev)

            def call(part: torch.Tensor, y: torch.Tensor | None = y) -> torch.Tensor:
                return fn(part) if y is None else fn(part, y)

            if tile and (h > tile or w > tile):
                # Each tile is its own exact bijection, so the whole image is too; tiles
                # bound the network's memory on large photos.
                res = torch.empty_like(x)
                for i in range(0, h, tile):
                    for j in range(0, w, tile):
                        part = x[..., i : i + tile, j : j + tile].contiguous()
                        res[..., i : i + tile, j : j + tile] = call(part)
            else:
                res = call(x)
            out[start : start + step] = finish(res).cpu()
    return out


def apply_protector(
    net: Any,
    images_u8: torch.Tensor | np.ndarray,
    labels: Labels = None,
    *,
    inverse: bool = False,
    tile: int = 0,
    batch_size: int | None = 64,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Protects (or restores) 8-bit images with a protector and stores them in 8 bits.

    Args:
        net: a protector (``InvertibleProtector``, ``EncoderDecoderProtector``) or one of
            its bound methods (``net.forward``, ``net.inverse``), or any function of
            (B, C, H, W) float images in [0, 1].
        images_u8: (B, C, H, W) uint8 images (tensor or array).
        labels: (B,) int class labels; required by a label-conditioned protector, ignored
            by an unconditioned one.
        inverse: run ``net.inverse`` (restore) instead of ``net`` (protect).
        tile: images with a side above ``tile`` are processed in ``tile x tile`` tiles from
            the top-left corner (0: whole images); a multiple of ``2**levels``.
        batch_size: images per network call (None: all at once). CPU convolutions give
            slightly different floats for other batch compositions; a restore that must
            reproduce exactly the values protect saw uses the same batching (1).
        device: where to run (default: the network's device); results come back on CPU.

    Returns:
        (B, C, H, W) uint8 on CPU: :func:`raeg_pl.utils.quantize.to_uint8` of the output.

    Raises:
        ValueError: not uint8 (B, C, H, W) images; labels missing for a conditioned
            protector, or of the wrong count or range.
    """
    return _run(net, images_u8, labels, inverse, tile, batch_size, device, to_uint8, torch.uint8)


def protector_values(
    net: Any,
    images_u8: torch.Tensor | np.ndarray,
    labels: Labels = None,
    *,
    inverse: bool = False,
    tile: int = 0,
    batch_size: int | None = 1,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """The protector's output before 8-bit rounding, on the 0..255 scale.

    Same arguments as :func:`apply_protector` (batch size 1 by default: the lossless
    sidecar needs values that do not depend on what else shares the batch).

    Returns:
        (B, C, H, W) float32 in [0, 255] on CPU: ``255 * clamp(output, 0, 1)``, not rounded;
        ``round`` of it is :func:`apply_protector`'s result.
    """

    def scale(y: torch.Tensor) -> torch.Tensor:
        return y.clamp(0, 1).mul(255).float()

    return _run(net, images_u8, labels, inverse, tile, batch_size, device, scale, torch.float32)
