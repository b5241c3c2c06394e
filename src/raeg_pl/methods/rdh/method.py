"""The RDH baseline as a protection method: sparse PGD whose perturbation is hidden in the
protected image itself (:class:`ReversibleDataHidingMethod`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raeg_pl.attacks import pgd_linf
from raeg_pl.losses import label_permutation, targeted_labels
from raeg_pl.methods.base import ProtectionMethod, batches
from raeg_pl.methods.pgd import PerturbationBudget
from raeg_pl.methods.rdh.coding import RDHError, perturbation_code_length
from raeg_pl.methods.rdh.message import (
    HEADER_BITS,
    hide_fallback,
    hide_perturbation,
    recover_image,
    recovery_thresholds,
    reveal_first,
)
from raeg_pl.methods.rdh.pee import MAX_LAYERS, MAX_THRESHOLD, capacity_bits
from raeg_pl.metrics import psnr_db

__all__ = ["ReversibleDataHidingMethod"]


def _budget(capacity: int) -> int:
    """Perturbation-code bits to aim for in ``capacity``: the header and a small margin.

    Capacity is measured with padding bits; the real message moves later slots' prediction
    errors a little differently, so a code that fills the capacity exactly often misses.
    """
    return capacity - HEADER_BITS - 8 - capacity // 50


def _max_count(order: np.ndarray, flat: np.ndarray, budget: int, hi: int) -> int:
    """Largest ``k <= hi`` whose leading ``order`` values of ``flat`` code in ``budget`` bits.

    Returns -1 when not even the empty perturbation fits.
    """
    if perturbation_code_length(order[:0], order[:0]) > budget:
        return -1
    lo = 0
    while lo < hi:  # code length grows with k: bisect
        mid = (lo + hi + 1) // 2
        top = np.sort(order[:mid])
        if perturbation_code_length(top, np.abs(flat[top])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


class ReversibleDataHidingMethod(ProtectionMethod):
    """Reversible adversarial examples: sparse PGD whose perturbation is hidden in the image.

    :meth:`protect`, per batch of images:

    1. L-inf PGD of ``steps`` signed steps on the surrogates' mean cross-entropy (away from
       the label, or toward ``perm[y]`` when ``targeted``), in 8-bit levels, rounded to an
       integer perturbation ``d`` with ``|d| <= floor(eps)``; the absolute gradients are
       summed over the steps as each value's saliency. ``perm`` is RAEG's own choice of
       target classes in its targeted mode (``adv_mode: targeted`` of
       :class:`raeg_pl.lit.protector.ProtectorLitModule`): the derangement
       :func:`raeg_pl.losses.label_permutation` of ``target_seed``, the protector's
       default 0, so both methods push each class toward the same class;
    2. per image, the ``k`` most salient non-zero values of ``d`` are kept, with ``k`` the
       largest whose code fits the hiding capacity of ``x + d_k`` (measured, iterated);
    3. PGD again from scratch for ``sparse_steps`` steps on that support only, then the
       kept perturbation is embedded (:func:`hide_perturbation`), dropping the least salient
       values until it fits.

    Protected images differ from ``x`` by at most ``floor(eps) + pee_threshold * layers``
    levels (fallback images, which carry no perturbation: ``FALLBACK_THRESHOLD * layers``).

    PSNR budget (``psnr``): both attacks run in the per-image L2 ball of that PSNR
    (:mod:`raeg_pl.methods.pgd`). The hiding adds its own distortion on top of the
    perturbation and may drop kept values, so each batch is hidden, measured, and attacked
    and hidden again in a ball corrected by each image's miss (``budget_passes`` times,
    :meth:`_meet_psnr`); images whose hiding alone exceeds the budget stay below it.
    :meth:`recover` needs only the protected images (and ``key`` when one was used) and is
    exact, or raises :class:`RDHError` on damaged images: tamper evidence comes from the
    CRC-32 of the original carried in every image (its limits: :mod:`raeg_pl.methods.rdh`).

    Args:
        surrogates: frozen classifiers (logits from [0, 1] images); needed to protect.
        device: where the attack runs (hiding runs on the CPU with numpy).
        batch_size: images per attack batch.
        seed: seed of the random start and of the label permutation.
        eps: L-inf radius of the adversarial perturbation in 8-bit levels; default 6
            without ``psnr``, no L-inf bound with it.
        steps: PGD steps of the dense attack (support selection).
        step_size: step in 8-bit levels; default ``2.5 * eps / steps``; with ``psnr``, a
            fraction of the L2 radius, default ``2.5 / steps``.
        sparse_steps: PGD steps on the kept support (default: ``steps``; 0 keeps the dense
            attack's values).
        targeted: push class ``c`` toward ``label_permutation(num_classes, target_seed)[c]``,
            RAEG's targets.
        num_classes: class count for ``targeted``; default the surrogates' ``num_classes``
            attribute, else the width of their logits.
        random_start: start the dense attack at a uniform point of the eps ball.
        pee_threshold: prediction-error expansion threshold ``T`` (1 = histogram shifting);
            larger holds more bits per layer at up to ``T`` levels of distortion per layer.
        max_layers: most passes of the data hiding over all slots.
        key: optional integer that scrambles the hidden perturbation; :meth:`recover` of a
            method with another key raises :class:`RDHError`.
        psnr: PSNR budget of the stored images in dB; None: the eps budget alone.
        target_seed: seed of the target derangement of ``targeted`` (RAEG's
            ``target_seed``; keep the two equal).
        budget_passes: with ``psnr``, re-attack and re-hide passes that correct each
            image's ball for the distortion of its hiding (each costs a sparse attack and
            a hiding).

    Attributes:
        stats: after :meth:`protect`, means over the images: ``kept_fraction`` (kept /
            non-zero values of the dense perturbation), ``kept_values``, ``payload_bits``
            (hidden message), ``capacity_bits`` (what the final image could carry with all
            layers), ``slots``, ``psnr_db``, ``linf``, and counts ``images``,
            ``fallback`` (message without perturbation, wide bins) and ``unembedded``
            (stored unchanged).
        per_image: per image (N,) tensors: ``kept_values``, ``dense_values``,
            ``kept_fraction``, ``payload_bits``, ``capacity_bits``, ``slots`` (float64),
            ``fallback`` and ``embedded`` (bool).
    """

    name = "rdh"
    reversible = True

    def __init__(
        self,
        surrogates: list[nn.Module] | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        seed: int = 0,
        eps: float | None = None,
        steps: int = 10,
        step_size: float | None = None,
        sparse_steps: int | None = None,
        targeted: bool = False,
        num_classes: int | None = None,
        random_start: bool = False,
        pee_threshold: int = 2,
        max_layers: int = 2,
        key: int | None = None,
        psnr: float | None = None,
        target_seed: int = 0,
        budget_passes: int = 2,
    ) -> None:
        super().__init__(surrogates=surrogates, device=device, batch_size=batch_size, seed=seed)
        self.budget = PerturbationBudget(6.0 if eps is None and psnr is None else eps, psnr)
        # 8-bit levels per value (eps budget), or a fraction of the L2 radius (psnr budget).
        step_size = self.budget.step(steps, step_size) * (1.0 if psnr is not None else 255.0)
        if not 1 <= pee_threshold <= MAX_THRESHOLD:
            raise ValueError(f"pee_threshold must be in [1, {MAX_THRESHOLD}], got {pee_threshold}")
        if not 1 <= max_layers <= MAX_LAYERS:
            raise ValueError(f"max_layers must be in [1, {MAX_LAYERS}], got {max_layers}")
        self.eps = self.budget.eps
        self.psnr = self.budget.psnr
        self.target_seed = int(target_seed)
        if budget_passes < 0:
            raise ValueError(f"budget_passes must be >= 0, got {budget_passes}")
        self.budget_passes = int(budget_passes)
        self.steps = int(steps)
        self.step_size = step_size
        self.sparse_steps = self.steps if sparse_steps is None else int(sparse_steps)
        self.targeted = bool(targeted)
        self.random_start = bool(random_start)
        self.pee_threshold = int(pee_threshold)
        self.max_layers = int(max_layers)
        if key is not None and int(key) < 0:
            raise ValueError(f"key must be a non-negative integer, got {key}")
        self.key = None if key is None else int(key)
        self.num_classes = self.surrogate_num_classes(num_classes)
        self.stats: dict[str, float] = {}
        self.per_image: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ attack
    def _attack_labels(self, labels: torch.Tensor, models: list[nn.Module], probe) -> torch.Tensor:
        labels = labels.long()
        if not self.targeted:
            return labels
        if self.num_classes is None:
            with torch.no_grad():
                self.num_classes = int(models[0](probe[:1]).shape[1])
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"{self.name}: labels must lie in [0, {self.num_classes})")
        return targeted_labels(labels, self.target_permutation)

    @property
    def target_permutation(self) -> torch.Tensor:
        """(K,) int64 target class of each class: RAEG's derangement of ``target_seed``."""
        if self.num_classes is None:
            raise ValueError(f"{self.name}: num_classes unknown; pass num_classes= or surrogates")
        return label_permutation(self.num_classes, self.target_seed)

    def _pgd(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        models: list[nn.Module],
        steps: int,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        radius: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L-inf PGD in 8-bit levels on the device.

        Args:
            images: (B, C, H, W) uint8.
            labels: (B,) int64 true labels.
            models: the surrogates.
            steps: number of signed gradient steps.
            mask: optional (B, C, H, W) bool support; values outside stay 0.
            generator: CPU generator of the random start (None: start at 0).
            radius: (B,) L2 radii in levels under a PSNR budget (default: the budget's).

        Returns:
            ``(d, saliency)``: (B, C, H, W) int16 integer perturbation on the CPU with
            ``|d| <= floor(eps)`` and ``x + d`` in [0, 255], and the summed absolute gradients.
        """
        x0 = images.to(self.device).float()
        y = self._attack_labels(labels, models, x0 / 255.0).to(self.device)
        saliency = torch.zeros_like(x0)

        def loss_fn(adv: torch.Tensor) -> torch.Tensor:
            return sum(
                F.cross_entropy(m(adv / 255.0).float(), y, reduction="sum") for m in models
            ) / len(models)

        def accumulate(i: int, adv: torch.Tensor, grad: torch.Tensor) -> None:
            saliency.add_(grad.abs())

        if self.psnr is not None and radius is None:
            radius = torch.full((len(x0),), 255.0 * self.budget.l2_radius(x0.shape[1:]))
        if radius is not None:
            radius = radius.to(device=x0.device, dtype=x0.dtype)
        # In 8-bit levels (images in [0, 255]): the perturbation is rounded to whole levels.
        adv = pgd_linf(
            x0,
            loss_fn,
            eps=255.0 * self.budget.linf,
            step_size=self.step_size if radius is None else self.step_size * radius,
            steps=steps,
            direction=-1 if self.targeted else 1,
            max_value=255.0,
            random_start=generator is not None,
            generator=generator,
            mask=mask,
            callback=accumulate,
            l2_radius=radius,
        )
        delta = adv - x0
        levels = 255 if self.eps is None else math.floor(self.eps + 1e-6)
        d = torch.round(delta.detach()).clamp_(-levels, levels)
        d = (x0 + d).clamp_(0, 255) - x0
        return d.to(torch.int16).cpu(), saliency.cpu()

    # ------------------------------------------------------------------ hiding
    def _fit_count(self, x: np.ndarray, d: np.ndarray, order: np.ndarray) -> tuple[int, int]:
        """Largest number of leading ``order`` values of ``d`` whose code fits ``x + d_k``.

        Capacity is measured on the image the code will live in; it falls as values are
        added (they spread the prediction errors), so measure, refit, and repeat.
        """
        flat = d.ravel()
        cap = self._capacity(x, flat, order, 0)
        k = _max_count(order, flat, _budget(cap), len(order))
        for _ in range(3):
            if k <= 0:
                break
            cap = self._capacity(x, flat, order, k)
            k_new = _max_count(order, flat, _budget(cap), k)
            if k_new >= k:
                break
            k = k_new
        return max(k, 0), cap

    def _capacity(self, x: np.ndarray, flat: np.ndarray, order: np.ndarray, k: int) -> int:
        """Hiding capacity of ``x`` plus the leading ``k`` values of ``order``."""
        sparse = np.zeros_like(flat)
        sparse[order[:k]] = flat[order[:k]]
        adv = (x.astype(np.int16) + sparse.reshape(x.shape)).astype(np.uint8)
        return capacity_bits(adv, self.pee_threshold, self.max_layers)

    def _hide(self, x: np.ndarray, d: np.ndarray, order: np.ndarray):
        """Embeds the leading values of ``order``, dropping the least salient until it fits.

        Returns ``(hide_perturbation result or None, values kept, fallback used)``.
        """
        flat = d.ravel()
        order = order[flat[order] != 0]
        k = len(order)
        while True:
            sparse = np.zeros_like(flat)
            sparse[order[:k]] = flat[order[:k]]
            out = hide_perturbation(
                x, sparse.reshape(x.shape), self.pee_threshold, self.max_layers, self.key
            )
            if out is not None:
                return out, k, False
            if k == 0:
                # Not even the empty perturbation fits: the fallback, or else unchanged.
                return hide_fallback(x, self.pee_threshold, self.key), 0, True
            # Refit to the capacity of the image as it is now, and always shrink.
            fit = _max_count(order, flat, _budget(self._capacity(x, flat, order, k)), k)
            k = max(0, min(fit, k - max(1, k // 20)))

    def protect(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Reversible adversarial copies of ``images``.

        Args:
            images: (N, C, H, W) uint8.
            labels: (N,) int64 true labels.

        Returns:
            (N, C, H, W) uint8 on the CPU; :meth:`recover` restores ``images`` exactly.
        """
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"expected (N, C, H, W) uint8 images, got {images.dtype} {tuple(images.shape)}"
            )
        if labels.dim() != 1 or len(labels) != len(images):
            raise ValueError(f"expected ({len(images)},) labels, got {tuple(labels.shape)}")
        models = self.frozen_surrogates() if len(images) else []
        generator = torch.Generator().manual_seed(self.seed) if self.random_start else None
        out = torch.empty_like(images, device="cpu")
        rec = {
            k: []
            for k in (
                "kept_values",
                "dense_values",
                "payload_bits",
                "capacity_bits",
                "slots",
                "fallback",
            )
        }
        for sl in batches(len(images), self.batch_size):
            x_b = images[sl].cpu()
            d_dense, saliency = self._pgd(x_b, labels[sl], models, self.steps, generator=generator)
            xs = x_b.numpy()
            masks = torch.zeros_like(x_b, dtype=torch.bool)
            orders, caps = [], []
            for i in range(len(xs)):
                di = d_dense[i].numpy()
                sal = saliency[i].numpy().ravel()
                nz = np.flatnonzero(di.ravel())
                order = nz[np.argsort(-sal[nz], kind="stable")]
                k, cap = self._fit_count(xs[i], di, order)
                masks[i].view(-1)[torch.from_numpy(order[:k])] = True
                orders.append(order)
                caps.append(cap)
                rec["dense_values"].append(len(nz))
            if self.sparse_steps > 0:
                d_sparse, _ = self._pgd(x_b, labels[sl], models, self.sparse_steps, mask=masks)
            else:
                d_sparse = torch.where(masks, d_dense, torch.zeros_like(d_dense))
            hidden = self._hide_batch(xs, d_sparse, orders, masks)
            if self.psnr is not None and self.sparse_steps > 0:
                hidden = self._meet_psnr(x_b, labels[sl], models, masks, orders, hidden)
            for i, (image, k, bits, slots, fallback) in enumerate(hidden):
                out[sl.start + i] = image
                rec["kept_values"].append(k)
                rec["payload_bits"].append(bits)
                rec["capacity_bits"].append(caps[i])
                rec["slots"].append(slots)
                rec["fallback"].append(fallback)
        self._record(images, out, rec)
        return out

    def _meet_psnr(self, x_b, labels, models, masks, orders, hidden) -> list[tuple]:
        """Re-attacks and re-hides a batch so its stored images land on the PSNR target.

        The hiding adds distortion and may drop kept values, so a stored image misses the
        target by ``r^2 - ||P - x||^2`` (squared levels; ``r`` the budget's radius). Each
        of ``budget_passes`` passes widens (or narrows) each image's ball by that miss and
        attacks and hides again: a fixed-point step on the stored distortion.
        """
        r2 = (255.0 * self.budget.l2_radius(tuple(x_b.shape[1:]))) ** 2
        ball = torch.full((len(x_b),), r2, dtype=torch.float64)
        for _ in range(self.budget_passes):
            stored = torch.stack([h[0] for h in hidden]).double()
            miss = r2 - (stored - x_b.double()).pow(2).flatten(1).sum(1)
            ball = (ball + miss).clamp_min(0)
            d_sparse, _ = self._pgd(
                x_b, labels, models, self.sparse_steps, mask=masks, radius=ball.sqrt().float()
            )
            hidden = self._hide_batch(x_b.numpy(), d_sparse, orders, masks)
        return hidden

    def _hide_batch(self, xs: np.ndarray, d_sparse: torch.Tensor, orders, masks) -> list[tuple]:
        """Hides each image's kept perturbation: per image ``(stored uint8 image, values
        kept, payload bits, slots, fallback used)``."""
        hidden = []
        for i in range(len(xs)):
            di = d_sparse[i].numpy()
            support = orders[i][masks[i].view(-1).numpy()[orders[i]]]
            result, k, fallback = self._hide(xs[i], di, support)
            if result is None:
                self._check_unembeddable(xs[i])
                hidden.append((torch.from_numpy(xs[i].copy()), 0, 0, 0, False))
            else:
                hidden.append((torch.from_numpy(result[0]), k, result[1], result[2], fallback))
        return hidden

    def _check_unembeddable(self, x: np.ndarray) -> None:
        """An unchanged image must not itself read as a valid protected image."""
        try:
            reveal_first(x, recovery_thresholds(self.pee_threshold), self.key)
        except RDHError:
            return
        raise RuntimeError(
            "an image that cannot carry hidden data reads as a protected image; "
            "it cannot be protected reversibly"
        )

    def _record(self, images: torch.Tensor, out: torch.Tensor, rec: dict[str, list]) -> None:
        per = {k: torch.tensor(v, dtype=torch.float64) for k, v in rec.items()}
        per["fallback"] = per["fallback"].bool()
        dense = per["dense_values"]
        per["kept_fraction"] = torch.where(dense > 0, per["kept_values"] / dense.clamp_min(1), 1.0)
        per["embedded"] = per["slots"] > 0
        self.per_image = per
        if len(images) == 0:
            self.stats = {"images": 0}
            return
        psnr = psnr_db(out, images).double()
        self.stats = {
            "images": len(images),
            "unembedded": int((~per["embedded"]).sum()),
            "fallback": int(per["fallback"].sum()),
            "kept_fraction": float(per["kept_fraction"].mean()),
            "kept_values": float(per["kept_values"].mean()),
            "dense_values": float(dense.mean()),
            "payload_bits": float(per["payload_bits"].mean()),
            "capacity_bits": float(per["capacity_bits"].mean()),
            "slots": float(per["slots"].mean()),
            "psnr_db": float(psnr.mean()),
            "linf": int((out.short() - images.short()).abs().max()),
        }

    # ------------------------------------------------------------------ recovery
    def recover(self, protected: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The original images, bit for bit, from protected images alone.

        Needs the same ``pee_threshold`` and ``key`` as protection (:func:`recover_image`).
        An image that could not carry any hidden data was stored unchanged and is returned as
        it is. A damaged protected image raises (see :mod:`raeg_pl.methods.rdh` for the rare
        cases where damage cannot be told from an image stored unchanged).

        Args:
            protected: (N, C, H, W) uint8 from :meth:`protect`.

        Returns:
            (N, C, H, W) uint8 originals.

        Raises:
            RDHError: an image was altered after protection, or the key differs.
        """
        if protected.dtype != torch.uint8 or protected.dim() != 4:
            raise ValueError(
                f"expected (N, C, H, W) uint8 images, got {protected.dtype} {tuple(protected.shape)}"
            )
        src = protected.cpu().numpy()
        out = np.empty_like(src)
        for i, p in enumerate(src):
            try:
                out[i] = recover_image(p, self.pee_threshold, self.key)
            except RDHError as err:
                raise RDHError(
                    f"image {i}: cannot recover: the protected image was altered, or the key "
                    f"or pee_threshold differ from protection ({err})"
                ) from err
        return torch.from_numpy(out)

    def config(self) -> dict[str, Any]:
        """Name, every parameter that determines the output, and the last ``stats``."""
        cfg = {
            "name": self.name,
            "eps": self.eps,
            "steps": self.steps,
            "step_size": self.step_size,
            "sparse_steps": self.sparse_steps,
            "targeted": self.targeted,
            "num_classes": self.num_classes,
            "random_start": self.random_start,
            "pee_threshold": self.pee_threshold,
            "max_layers": self.max_layers,
            "keyed": self.key is not None,
            "psnr": self.psnr,
            "target_seed": self.target_seed,
            "budget_passes": self.budget_passes,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "num_surrogates": len(self.surrogates),
        }
        if self.stats:
            cfg["stats"] = dict(self.stats)
        return cfg
