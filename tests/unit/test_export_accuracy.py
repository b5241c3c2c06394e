"""The export stage's accuracy helper runs each batch on the model's own device."""

from __future__ import annotations

import torch

from raeg_pl.stages.export import accuracy


class _OnDevice(torch.nn.Module):
    """Predicts class ``x.mean() > 0.5`` and records the device each batch arrived on."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, device=device))
        self.seen: list[torch.device] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.device)
        if x.device != self.w.device:  # what a CUDA model does with a host tensor
            raise RuntimeError("Expected all tensors to be on the same device")
        if x.device.type == "meta":  # no values on meta: every image is class 0
            return torch.tensor([[1.0, 0.0]]).repeat(len(x), 1)
        bright = (x.flatten(1).mean(1) > 0.5).float()
        return torch.stack([1 - bright, bright], 1)


def test_batches_go_to_the_model_device():
    images = torch.zeros(1200, 3, 4, 4, dtype=torch.uint8)
    labels = torch.zeros(1200, dtype=torch.long)
    labels[:300] = 1
    model = _OnDevice("meta")  # a second device on a machine without a GPU
    assert accuracy(model, images, labels) == 0.75
    assert model.seen == [torch.device("meta")] * 3  # batches of 500


def test_accuracy_values_on_the_host():
    images = torch.zeros(10, 3, 4, 4, dtype=torch.uint8)
    images[:4] = 255
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0, 1])
    assert accuracy(_OnDevice("cpu"), images, labels) == 0.8
