"""Tests of the RAEG loss terms and the PSNR controller on toy tensors and a toy classifier."""

from __future__ import annotations

import math

import pytest
import torch

from raeg_pl.losses import (
    PSNRController,
    class_margin,
    fidelity_loss,
    keep_classifiable_loss,
    label_permutation,
    out_of_range_penalty,
    psnr,
    quantize_ste,
    recovery_loss,
    targeted_adversarial_loss,
    targeted_labels,
    untargeted_adversarial_loss,
)

NUM_CLASSES = 10


@pytest.fixture()
def toy() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A random linear classifier, inputs, and the labels it currently predicts."""
    torch.manual_seed(0)
    model = torch.nn.Linear(20, NUM_CLASSES)
    x = torch.randn(64, 20)
    with torch.no_grad():
        labels = model(x).argmax(dim=1)
    return model, x, labels


def _input_step(loss_fn, model, x, labels, lr=0.05):
    """One gradient-descent step on the loss w.r.t. the input; returns the new input."""
    x = x.clone().requires_grad_(True)
    loss_fn(model(x), labels).backward()
    return (x - lr * x.grad).detach(), x.grad


def test_class_margin_values() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, -1.0]])
    torch.testing.assert_close(
        class_margin(logits, torch.tensor([0, 0])), torch.tensor([1.0, -5.0])
    )


@pytest.mark.parametrize("kind", ["margin", "capped_ce"])
def test_untargeted_step_lowers_true_class_margin(kind, toy) -> None:
    model, x, labels = toy

    def loss(z, y):
        return untargeted_adversarial_loss(z, y, kappa=100.0, kind=kind)

    x_new, _ = _input_step(loss, model, x, labels)
    with torch.no_grad():
        before = class_margin(model(x), labels)
        after = class_margin(model(x_new), labels)
        assert loss(model(x_new), labels) < loss(model(x), labels)
    assert after.mean() < before.mean()
    assert (after < before).float().mean() > 0.9


def test_untargeted_cap_zeroes_gradient_past_kappa() -> None:
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 4.0, 0.0], [0.0, 1.5, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 0])  # margins: +5, -4, -1.5
    kappa = 2.0
    per_sample = untargeted_adversarial_loss(logits, labels, kappa=kappa, reduction="none")
    torch.testing.assert_close(per_sample, torch.tensor([5.0, -2.0, -1.5]))
    per_sample.sum().backward()
    assert torch.equal(logits.grad[1], torch.zeros(3))  # margin -4 < -kappa: no push
    assert logits.grad[0].abs().sum() > 0 and logits.grad[2].abs().sum() > 0
    # Minimising lowers the true logit and raises the best other one.
    assert logits.grad[0, 0] > 0 and logits.grad[0, 1:].sum() < 0


def test_capped_ce_stops_past_kappa() -> None:
    logits = torch.tensor([[0.0, 10.0], [0.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 0])  # CE: ~10 nats, and log 2
    values = untargeted_adversarial_loss(
        logits, labels, kappa=3.0, kind="capped_ce", reduction="none"
    )
    torch.testing.assert_close(values, torch.tensor([-3.0, -math.log(2.0)]))
    values.sum().backward()
    assert torch.equal(logits.grad[0], torch.zeros(2))
    assert logits.grad[1, 0] > 0


def test_untargeted_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError):
        untargeted_adversarial_loss(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), kind="x")


def test_targeted_step_raises_target_logit(toy) -> None:
    model, x, labels = toy
    targets = targeted_labels(labels, label_permutation(NUM_CLASSES, seed=1))

    def loss(z, t):
        return targeted_adversarial_loss(z, t, kappa=100.0)

    x_new, _ = _input_step(loss, model, x, targets)
    with torch.no_grad():
        z_old, z_new = model(x), model(x_new)
    idx = torch.arange(len(x))
    assert (z_new[idx, targets] > z_old[idx, targets]).float().mean() > 0.9
    assert (class_margin(z_new, targets) > class_margin(z_old, targets)).all()


def test_targeted_cap_and_sign() -> None:
    logits = torch.tensor([[0.0, 6.0, 1.0], [2.0, 0.0, 1.0]], requires_grad=True)
    targets = torch.tensor([1, 1])  # target margins: +5 (reached), -2
    values = targeted_adversarial_loss(logits, targets, kappa=3.0, reduction="none")
    torch.testing.assert_close(values, torch.tensor([-3.0, 2.0]))
    values.sum().backward()
    assert torch.equal(logits.grad[0], torch.zeros(3))
    assert logits.grad[1, 1] < 0  # descent raises the target logit


def test_label_permutation_is_deterministic_derangement() -> None:
    for k in (2, 3, 10, 100):
        for seed in range(5):
            perm = label_permutation(k, seed=seed)
            assert perm.dtype == torch.long
            assert sorted(perm.tolist()) == list(range(k))
            assert (perm != torch.arange(k)).all()
            assert torch.equal(perm, label_permutation(k, seed=seed))
    assert not torch.equal(label_permutation(10, 0), label_permutation(10, 1))
    with pytest.raises(ValueError):
        label_permutation(1)


def test_targeted_labels_maps_through_permutation() -> None:
    perm = label_permutation(NUM_CLASSES, seed=0)
    labels = torch.tensor([0, 3, 9, 3])
    targets = targeted_labels(labels, perm)
    assert targets.tolist() == [perm[0].item(), perm[3].item(), perm[9].item(), perm[3].item()]
    assert (targets != labels).all()


def test_keep_classifiable_loss_is_cross_entropy() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(2.0)) / 2
    torch.testing.assert_close(keep_classifiable_loss(logits, labels), torch.tensor(expected))


def test_quantize_ste_grid_and_identity_gradient() -> None:
    x = torch.tensor([-0.2, 0.0, 0.1234, 0.5, 0.99999, 1.3, 0.001], requires_grad=True)
    q = quantize_ste(x)
    levels = q.detach() * 255
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    assert q.min() >= 0 and q.max() <= 1
    assert (q.detach() - x.detach().clamp(0, 1)).abs().max() <= 0.5 / 255 + 1e-7
    w = torch.randn(7)
    (q * w).sum().backward()
    torch.testing.assert_close(x.grad, w)


def test_out_of_range_penalty() -> None:
    inside = torch.rand(2, 3, 4, 4)
    assert out_of_range_penalty(inside) == 0
    assert out_of_range_penalty(torch.tensor([0.0, 1.0])) == 0
    outside = torch.tensor([1.5, -0.5, 0.5, 0.5])
    torch.testing.assert_close(out_of_range_penalty(outside), torch.tensor(0.125))
    x = torch.tensor([1.2, -0.1, 0.5], requires_grad=True)
    out_of_range_penalty(x).backward()
    assert x.grad[0] > 0 and x.grad[1] < 0 and x.grad[2] == 0  # pulls back into range


def test_fidelity_and_recovery_are_mse() -> None:
    a, b = torch.zeros(1, 3, 2, 2), torch.full((1, 3, 2, 2), 0.1)
    torch.testing.assert_close(fidelity_loss(a, b), torch.tensor(0.01))
    torch.testing.assert_close(recovery_loss(b, a), torch.tensor(0.01))


def test_psnr_values() -> None:
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[0] += 0.1  # MSE 1e-2 -> 20 dB
    b[1] += 0.01  # MSE 1e-4 -> 40 dB
    torch.testing.assert_close(psnr(b, a, reduction="none"), torch.tensor([20.0, 40.0]))
    torch.testing.assert_close(psnr(b, a), torch.tensor(30.0))
    torch.testing.assert_close(psnr(b * 255, a * 255, data_range=255.0), torch.tensor(30.0))
    assert math.isfinite(psnr(a, a).item())
    with pytest.raises(ValueError):
        psnr(a, a[:1])


def test_controller_direction_and_bounds() -> None:
    below = PSNRController(weight=1.0, target_psnr=33.0, rate=0.1, ema_decay=0.0)
    w = below.update(30.0)
    assert w > 1.0
    assert below.update(30.0) > w
    above = PSNRController(weight=1.0, target_psnr=33.0, rate=0.1, ema_decay=0.0)
    assert above.update(36.0) < 1.0
    at = PSNRController(weight=1.0, target_psnr=33.0, tolerance_db=0.5, ema_decay=0.0)
    assert at.update(33.2) == 1.0

    bounded = PSNRController(weight=1.0, rate=1.0, min_weight=0.5, max_weight=2.0, ema_decay=0.0)
    for _ in range(20):
        bounded.update(10.0)
    assert bounded.weight == 2.0
    for _ in range(20):
        bounded.update(float("inf"))
    assert bounded.weight == 0.5
    assert math.isfinite(bounded.ema_psnr)
    before = bounded.state_dict()
    bounded.update(float("nan"))
    assert bounded.state_dict() == before


def test_controller_ema_smooths_measurements() -> None:
    c = PSNRController(weight=1.0, target_psnr=33.0, rate=0.01, ema_decay=0.9)
    c.update(40.0)
    c.update(20.0)  # one low batch: the EMA (38.7 dB) stays above target
    assert c.ema_psnr == pytest.approx(0.9 * 40 + 0.1 * 20)
    assert c.weight < 1.0


def test_controller_state_round_trip() -> None:
    c = PSNRController(weight=1.2, target_psnr=30.0, rate=0.05, min_weight=0.1, max_weight=9.0)
    for p in (25.0, 28.0, 31.0):
        c.update(p)
    state = c.state_dict()
    d = PSNRController()
    d.load_state_dict(state)
    assert d.state_dict() == state
    assert d.update(27.0) == c.update(27.0)
    with pytest.raises(KeyError):
        d.load_state_dict({"bogus": 1})
