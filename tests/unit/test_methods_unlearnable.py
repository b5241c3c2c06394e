"""Error-minimising noise: its own stopping criterion, the rounds cap, class-wise noise and
the PSNR budget, on real CIFAR-10 with timm's tiny test network as the source model."""

from __future__ import annotations

import pytest
import torch

from raeg_pl.data.cache import load_split_cached
from raeg_pl.methods import create_method
from raeg_pl.methods.unlearnable import ErrorMinimizingNoiseMethod
from raeg_pl.metrics import psnr_db

SOURCE_ARCH = "test_convnext3"


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Small batches: one intra-op thread is as fast, and immune to a busy machine's stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cifar(data_root, cache_dir):
    """40 real CIFAR-10 training images, 4 per class, and 20 others (2 per class)."""
    train, _, _ = load_split_cached(data_root / "cifar10" / "train", cache_dir, "RGB")
    idx = torch.cat([(train.labels == c).nonzero().squeeze(1)[:6] for c in range(10)])
    idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(0))]
    images, labels = train.images[idx], train.labels[idx]
    return images[:40], labels[:40], images[40:], labels[40:]


def em(**kwargs) -> ErrorMinimizingNoiseMethod:
    spec = dict(arch=SOURCE_ARCH, batch_size=20, train_steps=4, pgd_steps=5, seed=0)
    return ErrorMinimizingNoiseMethod(**{**spec, **kwargs})


@pytest.mark.data
def test_stops_when_its_criterion_is_met_and_says_so(cifar):
    images, labels, _, _ = cifar
    method = em(rounds=30, stop_acc=0.99)
    method.fit(images, labels)
    cfg = method.config()
    history = method.source_acc_history
    # The paper's criterion: source accuracy on the noised images above 99%.
    assert cfg["criterion_met"] is True and history[-1] > 0.99, history
    assert cfg["rounds_run"] == len(history) < 30 and all(a <= 0.99 for a in history[:-1])


@pytest.mark.data
def test_the_rounds_cap_ends_a_fit_that_misses_the_criterion(cifar):
    images, labels, _, _ = cifar
    method = em(rounds=2, stop_acc=1.0, train_steps=1, pgd_steps=1)
    method.fit(images, labels)
    cfg = method.config()
    assert cfg["criterion_met"] is False and cfg["rounds_run"] == 2
    assert len(method.source_acc_history) == 2


@pytest.mark.data
def test_classwise_noise_is_one_pattern_per_class(cifar):
    images, labels, other, other_labels = cifar
    method = create_method(
        {
            "kind": "unlearnable",
            "classwise": True,
            "eps": 8,
            "arch": SOURCE_ARCH,
            "rounds": 3,
            "train_steps": 2,
            "pgd_steps": 1,
            "batch_size": 20,
        }
    )
    method.fit(images, labels)
    assert method.delta.shape == (10, *images.shape[1:])
    assert method.config()["classwise"] is True and method.protects_unseen
    # Unseen images of a class get the same pattern: it is a function of the label alone.
    out = method.protect(other, other_labels)
    diff = out.short() - other.short()
    expected = torch.round(method.delta[other_labels] * 255).short()
    inside = (other.short() + expected >= 0) & (other.short() + expected <= 255)
    # Up to float rounding of values within 1e-6 of a half level.
    off = (diff - expected)[inside].abs()
    assert int(off.max()) <= 1 and float((off == 0).float().mean()) > 0.999
    assert int(diff.abs().max()) <= 8
    first, second = (other_labels == other_labels[0]).nonzero().squeeze(1)[:2]
    both = inside[first] & inside[second]
    same = (diff[first][both] == diff[second][both]).float().mean()
    assert float(same) > 0.999


@pytest.mark.data
@pytest.mark.parametrize("classwise", [False, True])
def test_psnr_budget(cifar, classwise):
    images, labels, _, _ = cifar
    method = em(psnr=33.0, rounds=2, train_steps=2, pgd_steps=3, classwise=classwise)
    method.fit(images, labels)
    out = method.protect(images, labels)
    psnr = psnr_db(out, images)
    if classwise:
        # One pattern per class: clipping at 0/255 can only lower an image's distortion.
        assert float(psnr.min()) >= 33.0 - 0.3, psnr
    else:
        assert abs(float(psnr.mean()) - 33.0) <= 0.3, psnr
    assert method.config()["psnr"] == 33.0 and method.eps is None
