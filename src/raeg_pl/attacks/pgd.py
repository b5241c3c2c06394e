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

Two extensions serve distortion budgets other than a pure L-inf radius and long attacks:

* ``l2_radius``: a per-image L2 ball intersected with the L-inf box. Steps then follow the
  per-image L2-normalised gradient (the steepest-ascent direction of an L2 ball, Madry et
  al.'s L2 PGD) instead of its sign, and each iterate is clamped to the box first and then
  scaled toward ``x0`` onto the ball; both sets are convex and contain ``x0``, so the scaled
  iterate stays in the box. This is how a PSNR budget is enforced
  (:func:`l2_radius_for_psnr`): the MSE of an image is ``||x - x0||^2 / N``.
* ``patience``: stop once the attack loss has not improved for ``patience`` steps and
  return the best iterate seen (the loss of a fixed-size signed step oscillates around its
  optimum, so the last iterate is not the best one).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["l2_radius_for_psnr", "pgd_linf"]


def l2_radius_for_psnr(
    psnr_db: float, values_per_image: int, max_value: float = 1.0, quantized: bool = True
) -> float:
    """The L2 radius of a perturbation whose image lands at ``psnr_db`` after storage.

    PSNR ``= 10 log10(max_value^2 / MSE)`` with ``MSE = ||delta||^2 / N``, so a perturbation
    on the sphere of radius ``sqrt(N * MSE_target)`` has exactly that PSNR. With
    ``quantized``, rounding to 8 bits later adds about ``N / 12`` squared levels (rounding
    errors uniform in +-0.5 levels, independent of ``delta``); the radius leaves room for it,
    so the *stored* image lands on the target.

    Args:
        psnr_db: target PSNR in dB, > 0.
        values_per_image: ``N = C * H * W``.
        max_value: peak value of the images' units (1.0 for [0, 1], 255.0 for 8-bit levels).
        quantized: subtract the expected 8-bit rounding error.

    Returns:
        The radius in the images' units (0.0 when rounding alone exceeds the budget).
    """
    if psnr_db <= 0 or values_per_image <= 0:
        raise ValueError(
            f"l2_radius_for_psnr: need psnr_db > 0 and values_per_image > 0, got {psnr_db}, "
            f"{values_per_image}"
        )
    mse = max_value**2 * 10.0 ** (-psnr_db / 10.0)
    if quantized:
        mse -= (max_value / 255.0) ** 2 / 12.0
    return math.sqrt(max(mse, 0.0) * values_per_image)


def pgd_linf(
    images: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    eps: float,
    step_size: float | torch.Tensor,
    steps: int,
    direction: int = 1,
    max_value: float = 1.0,
    start: torch.Tensor | None = None,
    random_start: bool = False,
    generator: torch.Generator | None = None,
    mask: torch.Tensor | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    l2_radius: float | torch.Tensor | None = None,
    patience: int | None = None,
    min_improvement: float = 1e-3,
    info: dict | None = None,
) -> torch.Tensor:
    """L-inf projected gradient ascent (``direction=1``) or descent (``-1``) on ``loss_fn``.

    Args:
        images: (B, ...) float, the clean images (the ball's centre), in ``[0, max_value]``.
        loss_fn: maps an iterate (same shape as ``images``, requiring grad) to a scalar
            loss. Only the sign of its gradient moves the iterate; sum per-sample losses
            rather than averaging them when ``callback`` uses the gradient's magnitude.
        eps: L-inf radius in the units of ``images`` (``levels / 255`` for [0, 1] images),
            >= 0.
        step_size: step per iteration in the same units, >= 0; with ``l2_radius`` it may
            also be a (B,) tensor, one L2 step length per image.
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
        l2_radius: optional L2 radius per image (a float, or a (B,) tensor), in the units of
            ``images``: iterates also satisfy ``||x - x0||_2 <= l2_radius`` per image, and
            each step moves ``step_size`` (in L2 units) along the image's L2-normalised
            gradient instead of ``step_size`` per value along its sign.
        patience: stop early once ``patience`` consecutive steps brought no improvement of
            the loss (in ``direction``) by more than ``min_improvement`` times its best
            magnitude; an attack that stops early returns the best iterate seen. None runs
            all ``steps``.
        min_improvement: relative improvement that resets the patience count, >= 0.
        info: optional dict that receives ``steps`` (gradient steps taken),
            ``stopped_early`` and ``best_loss`` (the loss of the returned iterate, when
            ``patience`` is set; else of the last evaluated iterate).

    Returns:
        (B, ...) detached tensor of ``images``' dtype and device, each value in
        ``[max(x0 - eps, 0), min(x0 + eps, max_value)]`` (``x0``: the clean value), and
        within ``l2_radius`` of ``x0`` when given.

    Raises:
        ValueError: a negative ``eps``, ``step_size``, ``steps`` or ``l2_radius``, a
            ``direction`` other than +-1, both ``start`` and ``random_start``, a
            ``patience`` below 1, or shapes that differ.
    """
    per_image_step = isinstance(step_size, torch.Tensor)
    if per_image_step and l2_radius is None:
        raise ValueError("pgd_linf: a step_size per image needs l2_radius")
    if eps < 0 or bool((torch.as_tensor(step_size) < 0).any()) or steps < 0:
        raise ValueError(
            f"pgd_linf: eps, step_size and steps must be >= 0, got {eps}, {step_size}, {steps}"
        )
    if direction not in (1, -1):
        raise ValueError(f"pgd_linf: direction must be 1 or -1, got {direction}")
    if start is not None and random_start:
        raise ValueError("pgd_linf: give either start or random_start, not both")
    if patience is not None and patience < 1:
        raise ValueError(f"pgd_linf: patience must be >= 1 or None, got {patience}")
    if min_improvement < 0:
        raise ValueError(f"pgd_linf: min_improvement must be >= 0, got {min_improvement}")
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
    radius = None
    if l2_radius is not None:
        radius = torch.as_tensor(l2_radius, dtype=x0.dtype, device=x0.device)
        radius = radius.expand(x0.shape[0]) if radius.dim() == 0 else radius
        if radius.shape != (x0.shape[0],) or bool((radius < 0).any()):
            raise ValueError(
                f"pgd_linf: l2_radius must be >= 0, a float or one per image "
                f"({x0.shape[0]},), got {tuple(radius.shape)}"
            )
        radius = radius.view(-1, *([1] * (x0.dim() - 1)))

    def project(z: torch.Tensor) -> torch.Tensor:
        z = torch.max(torch.min(z, upper), lower)
        if radius is None:
            return z
        d = z - x0
        norm = d.flatten(1).norm(dim=1).view_as(radius)
        return x0 + d * torch.clamp(radius / norm.clamp_min(1e-12), max=1.0)

    x = project(x)
    if per_image_step:
        step_size = step_size.to(device=x0.device, dtype=x0.dtype).view_as(radius)
    step = direction * step_size
    best_x, best_loss, stale, taken, loss_value = None, None, 0, 0, None
    with torch.enable_grad():
        for i in range(steps):
            x.requires_grad_(True)
            loss = loss_fn(x)
            (grad,) = torch.autograd.grad(loss, x)
            loss_value = float(loss.detach())
            with torch.no_grad():
                x = x.detach()
                if patience is not None:
                    gain = math.inf if best_loss is None else direction * (loss_value - best_loss)
                    if gain > min_improvement * abs(best_loss or 0.0):
                        best_x, best_loss, stale = x.clone(), loss_value, 0
                    else:
                        stale += 1
                        if stale >= patience:
                            break
                if callback is not None:
                    callback(i, x, grad)
                if radius is None:
                    direction_of_move = grad.sign()
                else:
                    g = grad if keep is None else grad * keep
                    norm = g.flatten(1).norm(dim=1).view_as(radius)
                    direction_of_move = g / norm.clamp_min(1e-12)
                move = step * direction_of_move
                x = project(x + (move if keep is None else move * keep))
                taken = i + 1
    stopped = patience is not None and taken < steps
    if stopped:
        x = best_x
    if info is not None:
        info.update(
            steps=taken,
            stopped_early=stopped,
            best_loss=best_loss if patience is not None else loss_value,
        )
    return x.detach()
