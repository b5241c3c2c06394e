"""The 8-bit storage step, in one place: every module that rounds images to 8 bits uses these.

Rounding is ``torch.round`` (round half to even, the same as numpy's ``np.round``) after
clamping to [0, 1]. Images on disk are uint8; in memory they are float in [0, 1] on the grid
``{0, 1/255, ..., 1}``.
"""

from __future__ import annotations

import torch

__all__ = ["from_uint8", "quantize_8bit", "quantize_ste", "round_ste", "to_uint8"]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """The 8-bit storage step: float [0, 1] -> uint8 [0, 255], clamped and rounded.

    Args:
        x: float tensor of any shape, nominally in [0, 1] (uint8 input is returned unchanged).

    Returns:
        uint8 tensor of the same shape and device: ``round(clamp(x, 0, 1) * 255)``. No gradient.
    """
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise TypeError(f"to_uint8: expected a float or uint8 tensor, got {x.dtype}")
    return torch.round(x.detach().clamp(0.0, 1.0) * 255.0).to(torch.uint8)


def from_uint8(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [0, 255] -> float [0, 1] on the 8-bit grid (``x / 255``).

    Args:
        x: uint8 tensor of any shape (a float tensor is returned cast to ``dtype``).
        dtype: float dtype of the result.

    Returns:
        Float tensor of the same shape, values ``k / 255``.
    """
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise TypeError(f"from_uint8: expected a uint8 or float tensor, got {x.dtype}")
        return x.to(dtype)
    return x.to(dtype) / 255.0


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """Float images after 8-bit storage: clamp to [0, 1], round to the nearest ``k / 255``.

    Args:
        x: float tensor of any shape, nominally in [0, 1].

    Returns:
        Float tensor of the same shape, dtype and device on the 8-bit grid. No gradient.
    """
    return torch.round(x.detach().clamp(0.0, 1.0) * 255.0) / 255.0


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Straight-through rounding: ``round`` in the forward pass, identity gradient backward.

    Args:
        x: float tensor of any shape.

    Returns:
        ``torch.round(x)`` with the gradient of the identity.
    """
    return x + (torch.round(x) - x).detach()


def quantize_ste(x: torch.Tensor) -> torch.Tensor:
    """8-bit storage with a straight-through gradient.

    The forward value is :func:`quantize_8bit`'s; the backward pass treats the operation as
    the identity everywhere (straight-through estimator, Bengio et al., "Estimating or
    propagating gradients through stochastic neurons", 2013), including outside [0, 1],
    where a range penalty supplies the pull back into range.

    Args:
        x: float tensor of any shape, nominally in [0, 1].

    Returns:
        Tensor of the same shape and dtype, values on the grid ``{0, 1/255, ..., 1}``.
    """
    return x + (quantize_8bit(x) - x).detach()
