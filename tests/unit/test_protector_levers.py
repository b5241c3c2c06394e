"""The protector's levers against adaptive pirates: random-quality JPEG, class-pattern removal
in the curriculum, and the class-mean share of the perturbation (a loss and a metric)."""

from __future__ import annotations

import pytest
import torch

from raeg_pl.defenses import DefenseCurriculum, get_defense, ops
from raeg_pl.lit.protector import LabelledTrainingDefense, parse_train_defense
from raeg_pl.metrics import class_structure, classmean_share
from raeg_pl.utils.quantize import from_uint8, to_uint8


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int = 6, seed: int = 0) -> torch.Tensor:
    """(n, 3, 32, 32) on the 8-bit grid: smooth gradients plus texture, like photographs."""
    g = seeded(seed)
    ramp = torch.linspace(0, 1, 32)
    base = 0.2 + 0.6 * ramp[None, None, :, None] * torch.rand(n, 3, 1, 1, generator=g)
    x = base + 0.1 * torch.rand(n, 3, 32, 32, generator=g)
    return from_uint8(to_uint8(x.clamp(0, 1)))


# ----------------------------------------------------------------------------------------------
# Random-quality JPEG
# ----------------------------------------------------------------------------------------------


def test_random_jpeg_draws_qualities_over_its_whole_range():
    g = seeded(0)
    drawn = [ops.draw_jpeg_quality(10, 95, g) for _ in range(300)]
    assert min(drawn) >= 10 and max(drawn) <= 95
    assert min(drawn) <= 15 and max(drawn) >= 90  # JPEG-10 is trained against too
    assert len(set(drawn)) > 50
    assert ops.draw_jpeg_quality(40, 40, g) == 40


def test_random_jpeg_is_jpeg_ste_at_the_drawn_quality_in_both_forms():
    d = get_defense("jpeg_random:qmin=10,qmax=95")
    assert d.is_random and str(d) == "jpeg_random:qmin=10,qmax=95"
    assert get_defense("jpeg_rand:10,95") == d
    x = images()
    for seed in range(3):
        q = ops.draw_jpeg_quality(10, 95, seeded(seed))
        assert torch.equal(d.differentiable(x, seeded(seed)), ops.jpeg_ste(x, q))
        assert torch.equal(d.real(x, seeded(seed)), ops.jpeg_real(x, q))


def test_random_jpeg_differs_across_batches_and_stays_differentiable():
    d = get_defense("jpeg_random:qmin=10,qmax=95")
    g = seeded(1)
    x = images().requires_grad_(True)
    outs = [d.differentiable(x, g) for _ in range(4)]
    assert all(not torch.equal(outs[0], o) for o in outs[1:])  # a new quality per batch
    w = torch.randn(outs[0].shape, generator=seeded(7))
    (outs[0] * w).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().mean() > 1e-2


@pytest.mark.parametrize(
    "spec", ["jpeg_random:qmin=60,qmax=20", "jpeg_random:qmin=0", "jpeg_random:qmax=101"]
)
def test_random_jpeg_refuses_a_bad_range(spec):
    with pytest.raises(ValueError, match="jpeg_random"):
        get_defense(spec)


# ----------------------------------------------------------------------------------------------
# Class-pattern removal in the curriculum
# ----------------------------------------------------------------------------------------------


def classwise_batch(per_class: int = 4, classes: int = 3):
    """Flat-colour images (no high frequencies) plus a +-8/255 pattern per class."""
    g = seeded(2)
    labels = torch.arange(classes).repeat_interleave(per_class)
    clean = 0.3 + 0.4 * torch.rand(len(labels), 3, 1, 1, generator=g).expand(-1, 3, 32, 32)
    patterns = (torch.randint(0, 2, (classes, 3, 32, 32), generator=g) * 2 - 1) * 8 / 255
    return clean, clean + patterns[labels], labels


def test_curriculum_takes_classpattern_with_the_pirate_parameters():
    cur = DefenseCurriculum(["gray", "classpattern:sigma=1.5"], parse=parse_train_defense)
    labelled = cur.defenses[1]
    assert isinstance(labelled, LabelledTrainingDefense)
    assert str(labelled) == "classpattern:sigma=1.5"
    assert str(parse_train_defense("classpattern")) == "classpattern:sigma=2"
    assert [str(d) for d in cur.available(1.0)] == ["identity", "gray", "classpattern:sigma=1.5"]
    with pytest.raises(ValueError, match="classpattern:sigma=0"):
        parse_train_defense("classpattern:sigma=0")
    with pytest.raises(ValueError, match="cannot be simulated"):
        parse_train_defense("inverse:k=10")
    with pytest.raises(ValueError, match="unknown defence"):
        parse_train_defense("sharpen")


def test_classpattern_in_training_removes_a_class_pattern_and_passes_gradients():
    clean, stored, labels = classwise_batch()
    d = parse_train_defense("classpattern")
    x = stored.clone().requires_grad_(True)
    out = d.differentiable(x, labels, 3)
    before = (stored - clean).abs().mean() / (1 / 255)
    after = (out - clean).abs().mean() / (1 / 255)
    assert before > 5  # the pattern is there
    assert after < 0.25 * before, f"{after:.2f} levels left of {before:.2f}"
    w = torch.randn(out.shape, generator=seeded(3))
    (out * w).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().mean() > 0.1


# ----------------------------------------------------------------------------------------------
# Class-mean share
# ----------------------------------------------------------------------------------------------


def test_classmean_share_is_one_for_a_classwise_perturbation():
    clean, stored, labels = classwise_batch()
    assert float(classmean_share(stored - clean, labels, 3)) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("per_class", [5, 20])
def test_classmean_share_is_one_over_n_for_independent_noise(per_class):
    labels = torch.arange(10).repeat_interleave(per_class)
    noise = torch.randn(len(labels), 3, 32, 32, generator=seeded(4)) * 4 / 255
    share = float(classmean_share(noise, labels, 10))
    assert share == pytest.approx(1 / per_class, rel=0.05)


def test_classmean_share_of_no_perturbation_is_zero_with_zero_gradients():
    """A generator at the identity (no warm-up) changes nothing: share 0, gradients 0, not NaN."""
    zero = torch.zeros(6, 3, 8, 8, requires_grad=True)
    share = classmean_share(zero, torch.arange(6) % 3, 3)
    share.backward()
    assert float(share) == 0.0
    assert torch.equal(zero.grad, torch.zeros_like(zero))


def test_classmean_share_matches_class_structure_on_stored_images():
    clean, stored, labels = classwise_batch()
    noisy = stored + torch.randn(stored.shape, generator=seeded(5)) * 6 / 255
    c, p = to_uint8(clean), to_uint8(noisy)
    expected = class_structure(c, p, labels, 3)["classmean_share"]
    got = float(
        classmean_share(from_uint8(p, torch.float64) - from_uint8(c, torch.float64), labels, 3)
    )
    assert got == pytest.approx(expected, rel=1e-9)
    assert 0.2 < got < 0.9  # neither extreme, so the comparison means something


def test_classmean_share_gradient_lowers_it():
    clean, stored, labels = classwise_batch()
    d = (stored - clean) + torch.randn(stored.shape, generator=seeded(6)) * 4 / 255
    d.requires_grad_(True)
    share = classmean_share(d, labels, 3)
    share.backward()
    with torch.no_grad():
        step = d - 0.2 * d.norm() * d.grad / d.grad.norm()
        lower = classmean_share(step, labels, 3)
    assert float(share.detach()) > 0.5
    assert float(lower) < float(share.detach()) - 0.05


def test_classmean_share_of_no_perturbation_is_zero_and_checks_labels():
    x = torch.zeros(4, 3, 8, 8, requires_grad=True)
    share = classmean_share(x, torch.tensor([0, 0, 1, 1]), 2)
    share.backward()
    assert float(share.detach()) == 0.0 and torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="labels"):
        classmean_share(x, torch.tensor([0, 1]), 2)


# ----------------------------------------------------------------------------------------------
# Grid validation
# ----------------------------------------------------------------------------------------------


def test_grid_validation_reads_train_defences_as_the_protector_does():
    from pathlib import Path

    from raeg_pl.config import load_grid_config, validate_grid_config

    path = Path(__file__).resolve().parents[2] / "experiments" / "ablation" / "quick.yaml"
    cfg = load_grid_config(path)
    model = cfg["protector"]["model"]
    model["train_defenses"] = ["jpeg_random:qmin=10,qmax=95", "classpattern:sigma=2"]
    assert validate_grid_config(cfg) == []
    model["train_defenses"] = ["jpeg_random:qmin=90,qmax=10", "inverse:k=10"]
    problems = validate_grid_config(cfg)
    assert len(problems) == 2 and all("train_defenses" in p for p in problems), problems
