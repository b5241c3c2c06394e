"""Projected gradient descent in an L-inf ball: the one PGD loop of the code base.

Madry et al., "Towards deep learning models resistant to adversarial attacks", ICLR 2018:
per step ``x <- P(x + direction * a * sign(grad_x L(x)))``, where ``P`` clamps each value to
the intersection of the ball ``|x - x0|_inf <= eps`` and the image range ``[0, max_value]``.
The iterate is the image itself, not the perturbation, so every iterate lies exactly (in
floating point) inside that box. Everything that differs between its users is an argument:
the loss (untargeted cross-entropy, a target class, an ensemble, bf16 autocast), the sign
(``+1`` raises the loss: untargeted attacks; ``-1`` lowers it: targeted attacks and
error-minimising noise), the units (images in [0, 1] with radii in [0, 1] units, e.g.
``6 / 255``, or images in 8-bit levels with ``max_value=255`` and radii in levels), the start
(the image, a given point, or uniform in the ball from a seeded generator), a support mask
and a per-step callback (e.g. to accumulate gradient saliency).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["pgd_linf"]


def pgd_linf(
    images: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    eps: float,
    step_size: float,
    steps: int,
    direction: int = 1,
    max_value: float = 1.0,
    start: torch.Tensor | None = None,
    random_start: bool = False,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """L-inf projected gradient ascent (``direction=1``) or descent (``-1``) on ``loss_fn``.

    Args:
        images: (B, ...) float, the clean images (the ball's centre), in ``[0, max_value]``.
        loss_fn: maps an iterate (same shape as ``images``, requiring grad) to a scalar
            loss. Only the sign of its gradient moves the iterate; sum per-sample losses
            rather than averaging them when ``callback`` uses the gradient's magnitude.
        eps: L-inf radius in the units of ``images`` (``levels / 255`` for [0, 1] images),
            >= 0.
        step_size: step per iteration in the same units, >= 0.
        steps: number of gradient steps, >= 0.
        direction: ``1`` raises the loss (untargeted attack), ``-1`` lowers it (targeted
            attack, error-minimising noise).
        max_value: upper end of the image range: 1.0 for [0, 1] images, 255.0 for images in
            8-bit levels.
        start: optional (B, ...) starting point, projected onto the box first (default: the
            clean images). Not with ``random_start``.
        random_start: start at a uniform point of the ball, ``images + (2 u - 1) * eps``
            with ``u`` in [0, 1) (masked by ``mask``), projected onto ``[0, max_value]``;
            drawn only when ``eps > 0``.
        generator: generator of the random start, drawn on its own device (a CPU generator
            gives the same start on every device); None: the default generator of
            ``images``' device.
        mask: optional (B, ...) bool or 0/1 support; values outside it never move.
        callback: called as ``callback(i, x, grad)`` after the gradient of step ``i`` (0-based)
            is taken and before the step, with the iterate ``x`` and ``grad`` detached.

    Returns:
        (B, ...) detached tensor of ``images``' dtype and device, each value in
        ``[max(x0 - eps, 0), min(x0 + eps, max_value)]`` (``x0``: the clean value).

    Raises:
        ValueError: a negative ``eps``, ``step_size`` or ``steps``, a ``direction`` other
            than +-1, both ``start`` and ``random_start``, or shapes that differ.
    """
    if eps < 0 or step_size < 0 or steps < 0:
        raise ValueError(
            f"pgd_linf: eps, step_size and steps must be >= 0, got {eps}, {step_size}, {steps}"
        )
    if direction not in (1, -1):
        raise ValueError(f"pgd_linf: direction must be 1 or -1, got {direction}")
    if start is not None and random_start:
        raise ValueError("pgd_linf: give either start or random_start, not both")
    for name, t in (("start", start), ("mask", mask)):
        if t is not None and t.shape != images.shape:
            raise ValueError(
                f"pgd_linf: {name} has shape {tuple(t.shape)}, images {tuple(images.shape)}"
            )
    x0 = images.detach()
    keep = None if mask is None else mask.to(device=x0.device, dtype=x0.dtype)
    lower = (x0 - eps).clamp(min=0.0)
    upper = (x0 + eps).clamp(max=max_value)
    if start is not None:
        x = start.detach().to(device=x0.device, dtype=x0.dtype)
    elif random_start and eps > 0:
        device = generator.device if generator is not None else x0.device
        noise = torch.rand(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        noise = noise.mul_(2.0).sub_(1.0).mul_(eps).to(x0.device)
        x = x0 + (noise if keep is None else noise * keep)
    else:
        x = x0.clone()
    x = torch.max(torch.min(x, upper), lower)
    step = direction * step_size
    with torch.enable_grad():
        for i in range(steps):
            x.requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_fn(x), x)
            with torch.no_grad():
                x = x.detach()
                if callback is not None:
                    callback(i, x, grad)
                move = step * grad.sign()
                x = x + (move if keep is None else move * keep)
                x = torch.max(torch.min(x, upper), lower)
    return x.detach()
