"""The shared L-inf PGD (raeg_pl.attacks.pgd_linf): direction, projection, seeding, options."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raeg_pl.attacks import pgd_linf

EPS = 8 / 255


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Tiny tensors: one intra-op thread is as fast, and immune to a busy machine's stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model(seed: int = 0) -> nn.Module:
    """A random linear classifier: logits (B, 10) from (B, 3, 12, 12) in [0, 1].

    Linear, so an 8-level perturbation moves the summed loss of 8 images (~26) by ~2.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 10)).eval()


def batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, 12, 12) float images in [0, 1] including saturated values, and (n,) labels."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 3, 12, 12, generator=g) * 1.2 - 0.1).clamp(0, 1)
    return x, torch.randint(0, 10, (n,), generator=g)


def ce(model: nn.Module, y: torch.Tensor):
    return lambda x: F.cross_entropy(model(x), y, reduction="sum")


def assert_in_box(x, x0, eps, max_value=1.0):
    """Every value within the ball around ``x0`` and within ``[0, max_value]``, exactly."""
    assert (x >= (x0 - eps).clamp(min=0)).all() and (x <= (x0 + eps).clamp(max=max_value)).all()
    assert x.min() >= 0 and x.max() <= max_value


def test_ascent_raises_and_descent_lowers_the_loss():
    model, (x0, y) = tiny_model(), batch()
    loss = ce(model, y)
    clean = loss(x0).item()
    up = pgd_linf(x0, loss, eps=EPS, step_size=2 / 255, steps=5)
    down = pgd_linf(x0, loss, eps=EPS, step_size=2 / 255, steps=5, direction=-1)
    assert loss(up).item() > clean + 1.0
    assert loss(down).item() < clean - 1.0
    # A targeted attack is descent on the target class's loss.
    target_loss = ce(model, (y + 1) % 10)
    hit = pgd_linf(x0, target_loss, eps=EPS, step_size=2 / 255, steps=5, direction=-1)
    assert target_loss(hit).item() < target_loss(x0).item() - 1.0


def test_steps_follow_the_gradient_sign_and_stop_at_the_box():
    # A linear loss has a constant gradient w: each value walks k * step in the direction
    # sign(w) until the box stops it. Powers of two keep the float arithmetic exact.
    x0 = torch.tensor([[0.5, 0.5, 0.0, 1.0, 0.25, 0.75]])
    w = torch.tensor([[1.0, -1.0, -1.0, 1.0, 3.0, -0.5]])
    eps, step = 1 / 8, 1 / 32
    for steps, direction in ((2, 1), (7, 1), (3, -1)):
        x = pgd_linf(
            x0, lambda x: (w * x).sum(), eps=eps, step_size=step, steps=steps, direction=direction
        )
        expected = x0 + direction * min(steps * step, eps) * w.sign()
        expected = torch.max(torch.min(expected, (x0 + eps).clamp(max=1)), (x0 - eps).clamp(min=0))
        assert torch.equal(x, expected)


@pytest.mark.parametrize("max_value", [1.0, 255.0])
def test_respects_the_radius_and_the_image_range(max_value):
    model, (x0, y) = tiny_model(), batch()
    x0 = x0 * max_value
    eps = 8 / 255 * max_value

    def loss(x):
        return F.cross_entropy(model(x / max_value), y, reduction="sum")

    # A step larger than the radius, from a random start: every step hits the projection.
    for direction in (1, -1):
        x = pgd_linf(
            x0,
            loss,
            eps=eps,
            step_size=3 * eps,
            steps=4,
            direction=direction,
            max_value=max_value,
            random_start=True,
            generator=torch.Generator().manual_seed(0),
        )
        assert_in_box(x, x0, eps, max_value)
        assert (x - x0).abs().max() <= eps * (1 + 1e-6)
        assert not x.requires_grad and x.dtype == x0.dtype and x.shape == x0.shape


def test_random_start_is_seeded_and_uniform_in_the_ball():
    (x0, _) = batch(64)
    x0 = x0.clamp(0.1, 0.9)  # away from the range ends: the start is the ball's own draw

    def start(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return pgd_linf(
            x0, lambda x: x.sum(), eps=EPS, step_size=0, steps=0, random_start=True, generator=g
        )

    a, b, c = start(1), start(1), start(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert_in_box(a, x0, EPS)
    noise = (a - x0) / EPS  # uniform in [-1, 1]: mean ~0, std ~1/sqrt(3) over 27,648 values
    assert abs(noise.mean().item()) < 0.02
    assert noise.std().item() == pytest.approx(3**-0.5, abs=0.02)
    # The attack from a seeded start is deterministic too.
    model, (_, y) = tiny_model(), batch(64)
    runs = [
        pgd_linf(
            x0,
            ce(model, y),
            eps=EPS,
            step_size=1 / 255,
            steps=3,
            random_start=True,
            generator=torch.Generator().manual_seed(7),
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])
    # Without a generator the default one is used: torch.manual_seed fixes it.
    torch.manual_seed(3)
    d1 = pgd_linf(x0, ce(model, y), eps=EPS, step_size=1 / 255, steps=2, random_start=True)
    torch.manual_seed(3)
    d2 = pgd_linf(x0, ce(model, y), eps=EPS, step_size=1 / 255, steps=2, random_start=True)
    assert torch.equal(d1, d2)


def test_start_mask_and_callback():
    model, (x0, y) = tiny_model(), batch()
    mask = torch.rand(x0.shape, generator=torch.Generator().manual_seed(5)) < 0.3
    seen = []
    x = pgd_linf(
        x0,
        ce(model, y),
        eps=EPS,
        step_size=2 / 255,
        steps=3,
        mask=mask,
        callback=lambda i, it, grad: seen.append((i, grad.abs().sum().item(), it.requires_grad)),
    )
    assert torch.equal(x[~mask], x0[~mask])  # values outside the support never move
    assert (x[mask] != x0[mask]).float().mean() > 0.5
    assert [i for i, _, _ in seen] == [0, 1, 2]
    assert all(g > 0 and not rg for _, g, rg in seen)
    # A given start is projected onto the box first; zero steps return it as projected.
    far = x0 + 1.0
    out = pgd_linf(x0, ce(model, y), eps=EPS, step_size=1 / 255, steps=0, start=far)
    assert torch.equal(out, (x0 + EPS).clamp(max=1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eps": -1.0}, "must be >= 0"),
        ({"steps": -1}, "must be >= 0"),
        ({"step_size": -0.1}, "must be >= 0"),
        ({"direction": 0}, "direction must be 1 or -1"),
        ({"random_start": True, "start": torch.zeros(2, 3, 4, 4)}, "not both"),
        ({"mask": torch.ones(2, 3, 4, 5, dtype=torch.bool)}, "mask has shape"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    args = {"eps": EPS, "step_size": 1 / 255, "steps": 1} | kwargs
    with pytest.raises(ValueError, match=message):
        pgd_linf(torch.zeros(2, 3, 4, 4), lambda x: x.sum(), **args)


def test_l2_ball_holds_per_image_and_the_attack_reaches_its_sphere():
    from raeg_pl.attacks import l2_radius_for_psnr

    model, (x0, y) = tiny_model(), batch()
    radius = torch.linspace(0.1, 0.8, len(x0))
    info: dict = {}
    x = pgd_linf(
        x0,
        ce(model, y),
        eps=1.0,
        step_size=0.1,
        steps=30,
        l2_radius=radius,
        info=info,
        random_start=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert_in_box(x, x0, 1.0)
    norms = (x - x0).flatten(1).norm(dim=1)
    assert (norms <= radius + 1e-5).all()
    # An ascent attack uses its whole ball (up to what the [0, 1] box cuts).
    assert (norms >= 0.9 * radius).all(), (norms, radius)
    assert info["steps"] == 30 and info["stopped_early"] is False
    with pytest.raises(ValueError, match="l2_radius"):
        pgd_linf(x0, ce(model, y), eps=1.0, step_size=0.1, steps=1, l2_radius=-1.0)
    with pytest.raises(ValueError, match="per image needs l2_radius"):
        pgd_linf(x0, ce(model, y), eps=1.0, step_size=torch.ones(8), steps=1)
    # 33 dB of a 3x32x32 image: MSE 5.01e-4 less the 8-bit rounding error's share.
    r = l2_radius_for_psnr(33.0, 3072)
    expected = (3072 * (10**-3.3 - 1 / 12 / 255**2)) ** 0.5
    assert abs(r - expected) < 1e-9
    assert l2_radius_for_psnr(33.0, 3072, quantized=False) > r


def test_patience_stops_a_plateaued_attack_and_keeps_its_best_iterate():
    x0, _ = batch()
    calls = []

    def flat(x):  # a loss that never improves after its first value
        calls.append(1)
        return (x * 0).sum() + 1.0

    info: dict = {}
    out = pgd_linf(x0, flat, eps=EPS, step_size=1 / 255, steps=50, patience=3, info=info)
    assert info["stopped_early"] is True and info["steps"] == 3 and len(calls) == 4
    assert torch.equal(out, x0)  # the best iterate is the first one
    model, (x0, y) = tiny_model(), batch()
    info = {}
    pgd_linf(x0, ce(model, y), eps=EPS, step_size=1 / 255, steps=5, patience=10, info=info)
    assert info["steps"] == 5 and info["stopped_early"] is False
    with pytest.raises(ValueError, match="patience"):
        pgd_linf(x0, flat, eps=EPS, step_size=1 / 255, steps=5, patience=0)
