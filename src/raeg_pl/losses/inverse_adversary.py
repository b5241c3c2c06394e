"""The learned-inverse pirate, simulated while the protector trains.

The pirate's strongest countermeasure measured so far fits a small label-aware network
(:class:`~raeg_pl.defenses.pirate.InverseNet`) to a few leaked clean/protected pairs and
trains on what it outputs; 100 pairs undo the poison as well as 1,000. Here the same network
learns alongside the protector: each training step it takes ``steps`` Adam steps on the
batch's pairs (stored image -> original, MSE), and the protector is scored on the surrogate's
decision after that network has undone what it can (``l_invadv`` times the adversarial loss
on ``h(stored)``), so the generator is pushed to put its poison where such a network does
not learn to take it off.

The network's weights are its own (not the protector's optimiser's and not a registered
module, so DDP and the protector's checkpoint keys are unchanged); its state travels in the
checkpoint under ``inverse_adversary``. Under DDP each rank keeps its own pirate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raeg_pl.defenses.pirate import InverseNet


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
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        lr: float = 3e-3,
        seed: int = 0,
        steps: int = 1,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"inverse adversary: lr must be > 0, got {lr}")
        if steps < 1:
            raise ValueError(f"inverse adversary: steps must be >= 1, got {steps}")
        self.steps = steps
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
        with torch.enable_grad():
            for _ in range(self.steps):
                loss = F.mse_loss(self.net(stored, labels), images)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                self.opt.step()
        return float(loss.detach())

    def undo(self, stored: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The pirate's estimate of the originals, differentiable in ``stored`` and not in
        the pirate's weights (the protector's loss does not train the pirate)."""
        params = {k: v.detach() for k, v in self.net.named_parameters()}
        return torch.func.functional_call(self.net, params, (stored, labels))

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])


__all__ = ["InverseAdversary"]
