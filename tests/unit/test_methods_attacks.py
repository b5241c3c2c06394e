"""Attack-based baselines (PGD, class-targeted poison, error-minimising noise) on real CIFAR-10.

A small CNN trained here for a few seconds on real CIFAR-10 serves as the surrogate: the
attacks must fool *it*, so its clean accuracy only has to be clearly above chance.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raeg_pl.data.cache import load_split_cached
from raeg_pl.methods import create_method
from raeg_pl.methods.pgd import PGDMethod, TargetedPoisonMethod
from raeg_pl.methods.unlearnable import ErrorMinimizingNoiseMethod
from raeg_pl.metrics import from_uint8, psnr_db
from raeg_pl.models.classifier import create_classifier

NUM_CLASSES = 10
# timm's own tiny test network: a real architecture, fast enough to run min-min in seconds.
SOURCE_ARCH = "test_convnext3"


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages and a linear head: logits (B, 10) from (B, 3, 32, 32) in [0, 1]."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in ((3, 16), (16, 32), (32, 64)):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
            layers.append(nn.MaxPool2d(2) if c_out < 64 else nn.AdaptiveAvgPool2d(1))
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x - 0.5))


def balanced_subset(images, labels, per_class: int, seed: int):
    """``per_class`` random images of each class, in a shuffled order."""
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in range(NUM_CLASSES):
        members = (labels == c).nonzero().squeeze(1)
        idx.append(members[torch.randperm(len(members), generator=g)[:per_class]])
    idx = torch.cat(idx)
    idx = idx[torch.randperm(len(idx), generator=g)]
    return images[idx], labels[idx]


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(from_uint8(images)).argmax(1) == labels).float().mean().item()


def predictions(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(from_uint8(images)).argmax(1)


def linf_levels(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.int() - b.int()).abs().max())


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Small batches: one intra-op thread is as fast, and immune to a busy machine's stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cifar(data_root, cache_dir):
    """Real CIFAR-10: 1,000 training and 200 test images, balanced over the classes."""
    train, _, _ = load_split_cached(data_root / "cifar10" / "train", cache_dir, "RGB")
    test, _, _ = load_split_cached(data_root / "cifar10" / "test", cache_dir, "RGB")
    assert train.classes == test.classes and len(train.classes) == NUM_CLASSES
    return {
        "train": balanced_subset(train.images, train.labels, 100, seed=0),
        "test": balanced_subset(test.images, test.labels, 20, seed=1),
    }


@pytest.fixture(scope="module")
def surrogate(cifar):
    """A frozen SmallCNN trained for 5 epochs on the 1,000 real training images."""
    images, labels = cifar["train"]
    torch.manual_seed(0)
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        order = torch.randperm(len(images), generator=g)
        for i in range(0, len(images), 50):
            b = order[i : i + 50]
            loss = F.cross_entropy(model(from_uint8(images[b])), labels[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.num_classes = NUM_CLASSES  # as load_surrogate sets it
    return model


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


def test_create_method_builds_each_baseline():
    model = SmallCNN().eval()
    model.num_classes = NUM_CLASSES
    pgd = create_method({"kind": "pgd", "eps": 4}, [model], seed=3, batch_size=8)
    assert type(pgd) is PGDMethod and not pgd.reversible
    assert (pgd.eps, pgd.steps, pgd.step_size, pgd.seed, pgd.batch_size) == (4.0, 10, 1.0, 3, 8)
    assert pgd.config()["name"] == "pgd" and pgd.config()["eps"] == 4.0

    poison = create_method({"kind": "poison", "eps": 8, "steps": 5}, [model])
    assert type(poison) is TargetedPoisonMethod and poison.num_classes == NUM_CLASSES
    cfg = poison.config()
    assert cfg["name"] == "poison" and cfg["steps"] == 5 and len(cfg["target_permutation"]) == 10

    ue = create_method({"kind": "unlearnable", "rounds": 2}, [model])
    assert type(ue) is ErrorMinimizingNoiseMethod and ue.surrogates == []
    assert pgd.protects_unseen and poison.protects_unseen and not ue.protects_unseen
    assert ue.config()["rounds"] == 2 and ue.config()["rounds_run"] is None

    with pytest.raises(TypeError):
        create_method({"kind": "pgd", "epsilon": 4}, [model])
    with pytest.raises(ValueError, match="eps"):
        create_method({"kind": "pgd", "eps": -1}, [model])


def test_pgd_without_surrogates_names_the_problem():
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="surrogate"):
        PGDMethod().protect(images, torch.zeros(2, dtype=torch.long))


# ----------------------------------------------------------------------------------------------
# PGD adversarial examples
# ----------------------------------------------------------------------------------------------


@pytest.mark.data
def test_pgd_stays_within_eps_and_fools_the_surrogate(cifar, surrogate):
    images, labels = cifar["test"]
    clean_acc = accuracy(surrogate, images, labels)
    assert clean_acc > 0.25, f"surrogate too weak to test against: {clean_acc:.3f}"

    method = PGDMethod([surrogate], eps=6, steps=10, batch_size=64)
    out = method.protect(images, labels)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert linf_levels(out, images) == 6  # the whole budget is used, never more
    adv_acc = accuracy(surrogate, out, labels)
    assert adv_acc < clean_acc / 4, (clean_acc, adv_acc)

    # An ensemble of the surrogate with itself is the same attack.
    twice = PGDMethod([surrogate, surrogate], eps=6, steps=10, batch_size=64).protect(
        images, labels
    )
    assert accuracy(surrogate, twice, labels) < clean_acc / 4


@pytest.mark.data
def test_pgd_is_deterministic_for_a_seed(cifar, surrogate):
    images, labels = (t[:32] for t in cifar["test"])
    a = PGDMethod([surrogate], eps=4, steps=3, seed=7).protect(images, labels)
    b = PGDMethod([surrogate], eps=4, steps=3, seed=7).protect(images, labels)
    c = PGDMethod([surrogate], eps=4, steps=3, seed=8).protect(images, labels)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.data
def test_pgd_storage_respects_a_fractional_eps_and_no_steps_is_identity(cifar, surrogate):
    images, labels = (t[:32] for t in cifar["test"])
    out = PGDMethod([surrogate], eps=4.5, step_size=1.0, steps=5).protect(images, labels)
    assert linf_levels(out, images) == 4
    unchanged = PGDMethod([surrogate], steps=0, random_start=False).protect(images, labels)
    assert torch.equal(unchanged, images)
    # A random start alone moves pixels but stays within the ball.
    start = PGDMethod([surrogate], eps=3, steps=0).protect(images, labels)
    assert linf_levels(start, images) == 3


# ----------------------------------------------------------------------------------------------
# Class-targeted adversarial poisoning
# ----------------------------------------------------------------------------------------------


@pytest.mark.data
def test_poison_moves_images_to_their_derangement_target(cifar, surrogate):
    images, labels = cifar["test"]
    method = TargetedPoisonMethod([surrogate], eps=8, steps=10, batch_size=64, seed=0)
    targets = method.permutation[labels]
    # A derangement: no image is pushed toward its own class.
    assert not (targets == labels).any()
    assert sorted(method.permutation.tolist()) == list(range(NUM_CLASSES))

    out = method.protect(images, labels)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert linf_levels(out, images) <= 8
    hit = (predictions(surrogate, out) == targets).float().mean().item()
    clean_hit = (predictions(surrogate, images) == targets).float().mean().item()
    # Untargeted PGD fools the surrogate too, but lands on the target class far less often.
    untargeted = PGDMethod([surrogate], eps=8, steps=10, batch_size=64).protect(images, labels)
    untargeted_hit = (predictions(surrogate, untargeted) == targets).float().mean().item()
    # Measured: 0.49 (untargeted 0.11, clean 0.115) against a surrogate with 37.5% clean accuracy.
    assert hit > 0.35, hit  # chance is 1/10
    assert hit > clean_hit + 0.25 and hit > untargeted_hit + 0.25, (hit, clean_hit, untargeted_hit)


def test_poison_class_count_from_surrogate_kwarg_or_logits():
    plain = SmallCNN(num_classes=7).eval()  # no num_classes attribute
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    labels = torch.tensor([0, 3, 6, 2])
    inferred = TargetedPoisonMethod([plain], steps=1)
    assert inferred.num_classes is None
    out = inferred.protect(images, labels)
    assert inferred.num_classes == 7 and out.shape == images.shape
    assert TargetedPoisonMethod([plain], num_classes=7).permutation.tolist() == (
        inferred.permutation.tolist()
    )
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        TargetedPoisonMethod([plain], num_classes=5, steps=1).protect(images, labels)
    other = SmallCNN(num_classes=5).eval()
    plain.num_classes, other.num_classes = 7, 5
    with pytest.raises(ValueError, match="disagree"):
        TargetedPoisonMethod([plain, other])


# ----------------------------------------------------------------------------------------------
# PSNR budget and early stop
# ----------------------------------------------------------------------------------------------


@pytest.mark.data
@pytest.mark.parametrize("kind", ["pgd", "poison"])
def test_psnr_budget_lands_on_target_on_real_images(cifar, surrogate, kind):
    images, labels = (t[:100] for t in cifar["train"])
    method = create_method({"kind": kind, "psnr": 33.0, "steps": 8}, [surrogate], batch_size=50)
    assert method.eps is None and method.config()["psnr"] == 33.0
    out = method.protect(images, labels)
    psnr = psnr_db(out, images)
    assert abs(float(psnr.mean()) - 33.0) <= 0.3, float(psnr.mean())
    # Per image too: the ball holds every image's budget, not only the mean.
    assert float(psnr.min()) > 32.7, float(psnr.min())
    # Same budget, no L-inf bound: the attack concentrates far beyond 6 levels.
    assert linf_levels(out, images) > 12
    # ...and still works: the surrogate's accuracy falls, or its predictions reach the targets.
    if kind == "pgd":
        assert accuracy(surrogate, out, labels) < accuracy(surrogate, images, labels) - 0.2
    else:
        target = method.permutation[labels]
        hits = (predictions(surrogate, out) == target).float().mean().item()
        assert hits > (predictions(surrogate, images) == target).float().mean().item() + 0.2


@pytest.mark.data
def test_psnr_and_eps_budgets_hold_together(cifar, surrogate):
    images, labels = (t[:50] for t in cifar["train"])
    method = PGDMethod([surrogate], eps=6, psnr=36.0, steps=5, batch_size=50)
    out = method.protect(images, labels)
    assert linf_levels(out, images) <= 6
    # The ball bounds every image's distortion, up to 8-bit rounding.
    psnr = psnr_db(out, images)
    assert float(psnr.min()) >= 36.0 - 0.5 and float(psnr.mean()) >= 36.0 - 0.3, psnr


@pytest.mark.data
def test_early_stop_stops_once_the_loss_stops_improving(cifar, surrogate):
    images, labels = (t[:50] for t in cifar["train"])
    # One level of budget is used up within a few steps of 0.5 levels: the loss plateaus.
    spec = {"eps": 1, "step_size": 0.5, "steps": 200, "random_start": False}
    stopped = PGDMethod([surrogate], batch_size=25, patience=3, **spec)
    out = stopped.protect(images, labels)
    stats = stopped.config()["stats"]
    assert stats["stopped_early_batches"] == 2 and stats["mean_steps_run"] < 50, stats
    assert linf_levels(out, images) <= 1
    full = PGDMethod([surrogate], batch_size=25, **spec)
    full.protect(images, labels)
    assert full.stats["mean_steps_run"] == 200 and full.stats["stopped_early_batches"] == 0


def test_pgd_budget_arguments_are_checked():
    with pytest.raises(ValueError, match="psnr must be > 0"):
        PGDMethod([SmallCNN()], psnr=0.0)
    with pytest.raises(ValueError, match="patience"):
        PGDMethod([SmallCNN()], patience=0)
    assert PGDMethod([SmallCNN()]).eps == 6.0  # the L-inf default without a PSNR budget


# ----------------------------------------------------------------------------------------------
# Error-minimising noise (unlearnable examples)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unlearnable(cifar):
    """Error-minimising noise fitted on 200 of the real training images (all 10 classes)."""
    images, labels = (t[:200] for t in cifar["train"])
    method = ErrorMinimizingNoiseMethod(
        arch=SOURCE_ARCH, rounds=5, pgd_steps=4, step_size=1.5, batch_size=50, seed=0
    )
    method.fit(images, labels)
    return method, images, labels


def _train_losses(images: torch.Tensor, labels: torch.Tensor, steps: int = 20) -> list[float]:
    """Per-step training losses of a fresh classifier (SGD, fixed init and batch order)."""
    torch.manual_seed(1)
    model = create_classifier(SOURCE_ARCH, NUM_CLASSES)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(steps):
        b = torch.randint(0, len(images), (50,), generator=g)
        loss = F.cross_entropy(model(from_uint8(images[b])), labels[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.data
def test_unlearnable_noise_is_error_minimising(unlearnable):
    method, images, labels = unlearnable
    cfg = method.config()
    assert 1 <= cfg["rounds_run"] <= 5 and cfg["source_acc"] == method.source_acc_history[-1]
    # The min-min loop ends with a source model that fits the perturbed images.
    assert cfg["source_acc"] > 0.9, method.source_acc_history
    assert method.delta.shape == images.shape and method.delta.abs().max() <= 8 / 255 + 1e-6

    out = method.protect(images, labels)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert linf_levels(out, images) <= 8

    # A fresh model (other init) learns the protected images much faster than the clean ones.
    clean = _train_losses(images, labels)
    protected = _train_losses(out, labels)
    # Measured over the last 5 of 20 steps: 0.25 on protected vs 1.59 nats on clean images.
    clean_late = sum(clean[-5:]) / 5
    protected_late = sum(protected[-5:]) / 5
    assert protected_late < 0.5 * clean_late, (clean, protected)


@pytest.mark.data
def test_unlearnable_protect_only_accepts_the_fitted_images(unlearnable, cifar):
    method, images, labels = unlearnable
    test_images, test_labels = cifar["test"]
    with pytest.raises(ValueError, match="differ from those passed to fit"):
        method.protect(test_images, test_labels)
    with pytest.raises(ValueError, match="same order"):
        method.protect(images.flip(0), labels.flip(0))
    with pytest.raises(RuntimeError, match="fit"):
        ErrorMinimizingNoiseMethod().protect(images, labels)


@pytest.mark.data
def test_unlearnable_stops_once_the_source_model_fits(cifar):
    images, labels = (t[:20] for t in cifar["train"])

    def fit() -> ErrorMinimizingNoiseMethod:
        method = ErrorMinimizingNoiseMethod(
            arch=SOURCE_ARCH, rounds=4, train_steps=1, pgd_steps=2, stop_acc=0.05, batch_size=20
        )
        method.fit(images, labels)
        return method

    method = fit()
    history = method.source_acc_history
    # Stops at the first round whose accuracy exceeds stop_acc, not before.
    assert method.rounds_run == len(history) < 4, history
    assert history[-1] > 0.05 and all(acc <= 0.05 for acc in history[:-1]), history
    assert method.config()["rounds_run"] == method.rounds_run
    assert method.config()["source_acc"] == history[-1]
    assert torch.equal(fit().delta, method.delta)  # seeded
