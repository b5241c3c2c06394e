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

from raeg_pl.utils.quantize import from_uint8, quantize_8bit, quantize_ste, to_uint8

__all__ = ["apply_protector", "exact_math", "protector_values", "restore_aware_rounding"]

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


def restore_aware_rounding(
    forward: Callable[[torch.Tensor], torch.Tensor],
    inverse: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    steps: int,
    lr: float = 0.3,
) -> torch.Tensor:
    """Protected images on the 8-bit grid whose restore lies closer to the originals.

    Rounding ``forward(x)`` to 8 bits loses up to half a level per value, and the inverse
    amplifies that loss, most where the protected image was clipped at 0 or 255. Among the
    8-bit images near ``forward(x)``, this searches for one whose restore
    ``round(inverse(y))`` is closer to ``x``: ``steps`` Adam steps on the unrounded image
    ``t`` (in levels) against the restore's squared error, through straight-through
    rounding, keeping for each image the candidate with the smallest restore error seen
    (plain rounding included, so no image gets worse). Restoring is unchanged.

    Args:
        forward: the protector on float images in [0, 1] (labels bound already).
        inverse: its inverse (labels bound already).
        x: (B, C, H, W) float originals on the 8-bit grid.
        steps: search steps (0: plain rounding).
        lr: Adam step size, in 8-bit levels.

    Returns:
        (B, C, H, W) float protected images on the 8-bit grid ``k / 255``.
    """
    best = quantize_8bit(forward(x))
    if steps <= 0:
        return best
    best_err = torch.full((x.shape[0],), float("inf"), device=x.device)
    # The search variable is in 8-bit levels, so ``lr`` is too.
    t = (255.0 * best).requires_grad_(True)
    opt = torch.optim.Adam([t], lr=lr)
    with torch.enable_grad():
        for step in range(steps + 1):
            stored = quantize_ste(t / 255.0)
            restored = inverse(stored)
            # The candidate's true error: restores are stored in 8 bits too.
            err = (quantize_8bit(restored) - x).square().flatten(1).mean(1)
            better = err < best_err
            best[better] = stored.detach()[better]
            best_err = torch.minimum(best_err, err)
            if step == steps:
                break
            loss = (restored - x).square().sum()
            (t.grad,) = torch.autograd.grad(loss, [t])
            opt.step()
    return best


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
    refine_steps: int = 0,
    refine_lr: float = 0.3,
) -> torch.Tensor:
    fn, conditional, net_device = _network(net, inverse)
    if refine_steps < 0:
        raise ValueError(f"refine_steps must be >= 0, got {refine_steps}")
    if refine_steps and inverse:
        raise ValueError("refine_steps applies to protecting, not to restoring")
    refine_inverse = getattr(getattr(net, "__self__", net), "inverse", None)
    if refine_steps and refine_inverse is None:
        raise ValueError("refine_steps needs a protector with an inverse")
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
                if refine_steps:
                    fwd, inv = fn, refine_inverse
                    if y is not None:
                        fwd, inv = (lambda v: fn(v, y)), (lambda v: refine_inverse(v, y))
                    return restore_aware_rounding(fwd, inv, part, refine_steps, refine_lr)
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
    refine_steps: int = 0,
    refine_lr: float = 0.3,
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
        refine_steps: protecting only: search this many steps for stored images whose
            restore is closer to the originals (:func:`restore_aware_rounding`; 0: plain
            rounding). Costs about ``refine_steps`` forward, inverse and backward passes.
        refine_lr: the search's step size, in 8-bit levels.

    Returns:
        (B, C, H, W) uint8 on CPU: :func:`raeg_pl.utils.quantize.to_uint8` of the output.

    Raises:
        ValueError: not uint8 (B, C, H, W) images; labels missing for a conditioned
            protector, or of the wrong count or range; ``refine_steps`` negative, or given
            for a restore or a network without an inverse.
    """
    return _run(
        net,
        images_u8,
        labels,
        inverse,
        tile,
        batch_size,
        device,
        to_uint8,
        torch.uint8,
        refine_steps,
        refine_lr,
    )


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
