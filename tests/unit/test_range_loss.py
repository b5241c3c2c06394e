"""The protector's range term: the linear hinge beside the quadratic penalty, and the switch."""

from __future__ import annotations

import pytest
import torch

from raeg_pl.losses import (
    RANGE_LOSSES,
    out_of_range_penalty,
    range_hinge_penalty,
    range_penalty,
)

LEVEL = 1.0 / 255.0


def test_hinge_is_zero_inside_the_range() -> None:
    inside = torch.rand(2, 3, 8, 8)
    assert range_hinge_penalty(inside) == 0
    assert range_hinge_penalty(torch.tensor([0.0, 1.0, 0.5])) == 0
    # With a margin the free range shrinks: 0 and 1 now cost, the middle does not.
    assert range_hinge_penalty(torch.tensor([0.5]), margin=0.1) == 0
    assert range_hinge_penalty(torch.tensor([0.0]), margin=0.1) > 0
    # A negative margin tolerates what rounding maps back onto the range.
    assert range_hinge_penalty(torch.tensor([-0.4 * LEVEL, 1 + 0.4 * LEVEL]), -0.5 * LEVEL) == 0


def test_hinge_grows_linearly_outside() -> None:
    for d in (0.5 * LEVEL, 4 * LEVEL, 0.3):
        below, above = torch.tensor([-d, 0.5]), torch.tensor([0.5, 1 + d])
        torch.testing.assert_close(range_hinge_penalty(below), torch.tensor(d / 2))
        torch.testing.assert_close(range_hinge_penalty(above), torch.tensor(d / 2))
        torch.testing.assert_close(
            range_hinge_penalty(torch.tensor([-2 * d, 0.5])), 2 * range_hinge_penalty(below)
        )
    torch.testing.assert_close(
        range_hinge_penalty(torch.tensor([-0.1, 1.2]), margin=0.05), torch.tensor(0.2)
    )


def test_hinge_gradient_points_back_into_range_and_does_not_fade() -> None:
    x = torch.tensor([-LEVEL, -0.5, 1 + LEVEL, 1.5, 0.5], requires_grad=True)
    range_hinge_penalty(x).backward()
    g = x.grad
    # Descent (x - lr * g) raises values below 0 and lowers values above 1 ...
    assert g[0] < 0 and g[1] < 0 and g[2] > 0 and g[3] > 0 and g[4] == 0
    # ... by the same amount however small the excursion.
    torch.testing.assert_close(g[:4].abs(), torch.full((4,), 1 / 5))
    # One level out, the quadratic penalty's pull is 2/255 of the hinge's.
    q = torch.tensor([-LEVEL, 0.5], requires_grad=True)
    h = torch.tensor([-LEVEL, 0.5], requires_grad=True)
    out_of_range_penalty(q).backward()
    range_hinge_penalty(h).backward()
    torch.testing.assert_close(q.grad[0] / h.grad[0], torch.tensor(2 * LEVEL))


def test_range_penalty_switch() -> None:
    x = torch.tensor([-0.2, 0.5, 1.1])
    assert RANGE_LOSSES == ("quadratic", "hinge")
    torch.testing.assert_close(range_penalty(x), out_of_range_penalty(x))
    torch.testing.assert_close(range_penalty(x, "hinge"), range_hinge_penalty(x))
    torch.testing.assert_close(range_penalty(x, "hinge", 0.1), range_hinge_penalty(x, 0.1))
    with pytest.raises(ValueError, match="'cubic'"):
        range_penalty(x, "cubic")
    with pytest.raises(ValueError, match="margin"):
        range_hinge_penalty(x, margin=0.5)


@pytest.mark.data
def test_protector_steps_with_the_hinge_on(fit_tiny_protector) -> None:
    # Real images lie in [0, 1]: with the generator held near its identity initialisation
    # (no adversarial term, a tiny learning rate) the quadratic term is 0, while a hinge
    # with a margin of 0.1 costs every dark or bright pixel.
    still = {"warmup_steps": 100, "lr": 1e-8}
    model, trainer, _ = fit_tiny_protector(range_loss="hinge", range_margin=0.1, **still)
    assert model.hparams.range_loss == "hinge" and model.hparams.range_margin == 0.1
    assert trainer.global_step == 3
    assert float(trainer.callback_metrics["train/l_range"]) > 1e-3
    model_q, trainer_q, _ = fit_tiny_protector(**still)
    assert model_q.hparams.range_loss == "quadratic"
    assert float(trainer_q.callback_metrics["train/l_range"]) < 1e-6


@pytest.mark.data
def test_protector_refuses_an_unknown_range_loss(tiny_surrogate) -> None:
    from raeg_pl.lit.protector import ProtectorLitModule

    with pytest.raises(ValueError, match="range_loss must be one of .*'linear'"):
        ProtectorLitModule([str(tiny_surrogate)], range_loss="linear")
