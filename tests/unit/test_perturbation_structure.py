"""Class structure of a perturbation (share of energy in the class means, cosines) on real
CIFAR-10 images protected by the controls whose structure is known by construction."""

from __future__ import annotations

import pytest
import torch

from raeg_pl.data.cache import load_split_cached
from raeg_pl.methods import create_method
from raeg_pl.metrics import class_structure

NUM_CLASSES = 10
PER_CLASS = 30


@pytest.fixture(scope="module")
def images(data_root, cache_dir):
    """300 real CIFAR-10 training images, 30 per class, with their labels."""
    train, _, _ = load_split_cached(data_root / "cifar10" / "train", cache_dir, "RGB")
    idx = torch.cat(
        [(train.labels == c).nonzero().squeeze(1)[:PER_CLASS] for c in range(NUM_CLASSES)]
    )
    return train.images[idx], train.labels[idx]


def protect(kind: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    method = create_method({"kind": kind, "psnr": 36.0}, seed=0)
    method.fit(x, y)
    return method.protect(x, y)


@pytest.mark.data
def test_a_classwise_pattern_is_all_class_mean(images):
    x, y = images
    s = class_structure(x, protect("classwise_noise", x, y), y, NUM_CLASSES)
    # Clipping on saturated pixels makes a few images' perturbations differ slightly.
    assert s["classmean_share"] > 0.95
    assert s["cos_same_class"] > 0.95
    assert abs(s["cos_diff_class"]) < 0.05


@pytest.mark.data
def test_samplewise_noise_has_no_class_structure(images):
    x, y = images
    s = class_structure(x, protect("samplewise_noise", x, y), y, NUM_CLASSES)
    # Independent noise: the class mean of n perturbations keeps about 1/n of the energy.
    assert s["classmean_share"] == pytest.approx(1 / PER_CLASS, abs=0.02)
    assert abs(s["cos_same_class"]) < 0.02
    assert abs(s["cos_diff_class"]) < 0.02


@pytest.mark.data
def test_cosines_agree_with_explicit_pairs(images):
    x, y = images
    x, y = x[::3], y[::3]  # 100 images: every pair can be listed
    g = torch.Generator().manual_seed(1)
    pattern = torch.randint(-6, 7, (NUM_CLASSES, *x.shape[1:]), generator=g)
    noise = torch.randint(-6, 7, x.shape, generator=g)
    p = (x.long() + pattern[y] + noise).clamp(0, 255).to(torch.uint8)
    s = class_structure(x, p, y, NUM_CLASSES)
    d = (p.double() - x.double()).flatten(1) / 255
    u = d / d.norm(dim=1, keepdim=True)
    cos = u @ u.T
    same = y[:, None] == y[None, :]
    off = ~torch.eye(len(y), dtype=torch.bool)
    per_class = [cos[(y[:, None] == c) & (y[None, :] == c) & off].mean() for c in y.unique()]
    assert s["cos_same_class"] == pytest.approx(float(torch.stack(per_class).mean()), abs=1e-9)
    assert s["cos_diff_class"] == pytest.approx(float(cos[~same].mean()), abs=1e-9)
    means = torch.stack([d[y == c].mean(0) for c in range(NUM_CLASSES)])
    share = float((means[y] ** 2).sum() / (d**2).sum())
    assert s["classmean_share"] == pytest.approx(share, abs=1e-9)
    assert 0.2 < s["classmean_share"] < 0.9  # both parts are present


def test_bad_input_is_refused():
    x = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        class_structure(x.float(), x.float(), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        class_structure(x, x[:3], torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must lie"):
        class_structure(x, x, torch.tensor([0, 1, 2, 5]), num_classes=3)
    # No perturbation at all: no energy to share, no pair with a direction.
    s = class_structure(x, x, torch.tensor([0, 0, 1, 1]))
    assert all(v != v for v in s.values())
