"""The learned-inverse pirate, simulated while the protector trains.

The pirate's strongest countermeasure measured so far fits a small label-aware network
(:class:`~raeg_pl.defenses.pirate.InverseNet`) to a few leaked clean/protected pairs and
trains on what it outputs; 100 pairs undo the poison as well as 1,000. Here the same network
learns alongside the protector: each training step it takes ``steps`` Adam steps on the
batch's pairs (stored image -> original, MSE), and the protector is scored on the surrogate's
decision after that network has undone what it can (``l_invadv`` times the adversarial loss
on ``h(stored)``), so the generator is pushed to put its poison where such a network does
not learn to take it off.

A pirate that learns online, while the protector moves, undoes less than one fitted afresh
to the finished protector: by the end of the quick ablation's fit the online one is 1.3 dB
above the stored images where the grid's strong inverse (3,000 cosine-decayed steps on 1,000
fixed pairs) gains 3 dB. With ``refit_every`` N > 0 the pirate also keeps the last
``refit_pairs`` pairs it saw and, every N updates once it holds that many, replaces its
network by one fitted afresh to them with the grid's own fit
(:func:`~raeg_pl.defenses.pirate.fit_inverse`, ``refit_steps`` steps), so the protector is
scored against what such a pirate does to a (nearly) current protector; it then learns
online from there.

The network's weights are its own (not the protector's optimiser's and not a registered
module, so DDP and the protector's checkpoint keys are unchanged); its state travels in the
checkpoint under ``inverse_adversary``. Under DDP each rank keeps its own pirate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from raeg_pl.defenses.pirate import InverseNet, fit_inverse
from raeg_pl.utils.quantize import from_uint8, to_uint8

WARM_STEPS = 20  # rate-0 steps that fill a new optimiser's moments after a fit afresh


def fill_moments(
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    protected: torch.Tensor,
    clean: torch.Tensor,
    labels: torch.Tensor,
    seed: int,
) -> None:
    """Fills a new optimiser's moments with :data:`WARM_STEPS` steps at rate 0 on pairs
    (float images in [0, 1]; the weights do not move), then restores its rates.

    From empty moments Adam's first step moves every weight by the full rate: on the
    CIFAR-10 pairs of a trained protector that step costs a freshly fitted inverse about
    1 dB, won back over about 20 steps (``benchmarks/inverse_online_steps.py``).
    """
    gen = torch.Generator().manual_seed(seed)
    rates = [group["lr"] for group in opt.param_groups]
    for group in opt.param_groups:
        group["lr"] = 0.0
    with torch.enable_grad():
        for _ in range(WARM_STEPS):
            idx = torch.randint(len(protected), (min(64, len(protected)),), generator=gen)
            loss = F.mse_loss(net(protected[idx], labels[idx]), clean[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for group, rate in zip(opt.param_groups, rates, strict=True):
        group["lr"] = rate


class InverseAdversary:
    """A learned-inverse pirate that trains on each protector batch.

    Args:
        channels: image channels C.
        num_classes: classes of the labels it is given (the pirate knows them).
        image_size: (H, W) of the training images.
        lr: its Adam learning rate (the grid's learned-inverse pirate's peak rate).
        seed: seed of its initialisation.
        steps: Adam steps per batch. One step a batch leaves it 1.3 dB above the stored
            images by the end of a quick fit, where the grid's strong learned inverse gains
            3-4 dB; four steps reconstruct no better (its small network, not its step
            count, limits it; docs/RESULTS.md).
        refit_every: updates between fits afresh (0: never).
        refit_steps: optimiser steps of each fit afresh.
        refit_pairs: the most recent pairs each fit afresh uses (the leak it simulates).
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        lr: float = 3e-3,
        seed: int = 0,
        steps: int = 1,
        refit_every: int = 0,
        refit_steps: int = 1000,
        refit_pairs: int = 1000,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"inverse adversary: lr must be > 0, got {lr}")
        if steps < 1:
            raise ValueError(f"inverse adversary: steps must be >= 1, got {steps}")
        if refit_every < 0 or refit_steps < 1 or refit_pairs < 1:
            raise ValueError(
                "inverse adversary: need refit_every >= 0, refit_steps >= 1 and refit_pairs "
                f">= 1, got {refit_every}, {refit_steps} and {refit_pairs}"
            )
        self.steps, self.lr, self.seed, self.num_classes = steps, lr, seed, num_classes
        self.refit_every, self.refit_steps, self.refit_pairs = (
            refit_every,
            refit_steps,
            refit_pairs,
        )
        self.updates = 0  # update() calls so far
        self.refits = 0  # fits afresh so far
        self.last_refit = 0  # the update count at the last one
        self.refit_psnr: float | None = None  # its PSNR on its pairs (dB)
        self._pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = InverseNet(channels, num_classes, tuple(image_size))
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)

    def to(self, device: torch.device) -> InverseAdversary:
        """Moves the network to ``device`` (before its first step: the optimiser's moments
        are made, or loaded, on the parameters' device)."""
        self.net.to(device)
        return self

    def update(self, stored: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> float:
        """``steps`` Adam steps on the pairs (``stored`` -> ``images``); returns the MSE
        before the last one."""
        stored, images = stored.detach(), images.detach()
        self.updates += 1
        if self.refit_every:
            self._remember(stored, images, labels)
            held = len(self._pairs[0])
            if held >= self.refit_pairs and self.updates - self.last_refit >= self.refit_every:
                self.refit()
        with torch.enable_grad():
            for _ in range(self.steps):
                loss = F.mse_loss(self.net(stored, labels), images)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
        return float(loss.detach())

    def _remember(self, stored: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Keeps the last ``refit_pairs`` pairs as 8-bit images (what the pirate's leak holds)."""
        new = (to_uint8(stored), to_uint8(images), labels.detach())
        if self._pairs is not None:
            new = tuple(torch.cat([a, b]) for a, b in zip(self._pairs, new, strict=True))
        self._pairs = tuple(t[-self.refit_pairs :] for t in new)

    def refit(self) -> None:
        """Replaces the network by one fitted afresh to the kept pairs (and a new optimiser)."""
        protected, clean, labels = self._pairs
        self.refits += 1
        with torch.enable_grad():
            net = fit_inverse(
                protected,
                clean,
                labels,
                self.num_classes,
                steps=self.refit_steps,
                seed=self.seed + self.refits,
            )
        x, y = from_uint8(protected), from_uint8(clean)
        with torch.no_grad():
            mse = float(F.mse_loss(net(x, labels), y))
        self.refit_psnr = -10 * math.log10(max(mse, 1e-12))
        self.net = net.train()
        self.opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        fill_moments(self.net, self.opt, x, y, labels, self.seed + self.refits)
        self.last_refit = self.updates

    def undo(self, stored: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The pirate's estimate of the originals, differentiable in ``stored`` and not in
        the pirate's weights (the protector's loss does not train the pirate)."""
        params = {k: v.detach() for k, v in self.net.named_parameters()}
        return torch.func.functional_call(self.net, params, (stored, labels))

    def state_dict(self) -> dict:
        """Weights, optimiser and counters; not the kept pairs (a resumed fit gathers them
        again before its next fit afresh)."""
        counts = {"updates": self.updates, "refits": self.refits, "last_refit": self.last_refit}
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict(), **counts}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.updates = state.get("updates", 0)
        self.refits = state.get("refits", 0)
        self.last_refit = state.get("last_refit", 0)


__all__ = ["InverseAdversary", "fill_moments"]
