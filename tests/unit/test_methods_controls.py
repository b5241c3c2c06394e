"""Control protections (random class-wise / sample-wise noise, one-pixel shortcut) on real CIFAR-10."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raeg_pl.config import load_grid_config, validate_grid_config
from raeg_pl.data.cache import load_split_cached
from raeg_pl.methods import METHODS, create_method
from raeg_pl.methods.controls import (
    ClasswiseNoiseMethod,
    OnePixelShortcutMethod,
    SamplewiseNoiseMethod,
    calibrate_noise_scale,
)
from raeg_pl.metrics import ImageQuality, psnr_db

REPO = Path(__file__).resolve().parents[2]
NUM_CLASSES = 10
PER_CLASS = 20
TOL_DB = 0.1


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Small batches: one intra-op thread is as fast, and immune to a busy machine's stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def balanced(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of ``per_class`` random images of each class, shuffled."""
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in range(NUM_CLASSES):
        members = (labels == c).nonzero().squeeze(1)
        idx.append(members[torch.randperm(len(members), generator=g)[:per_class]])
    idx = torch.cat(idx)
    return idx[torch.randperm(len(idx), generator=g)]


@pytest.fixture(scope="module")
def cifar(data_root, cache_dir):
    """Real CIFAR-10: 200 balanced training images with the 8 most saturated ones appended,
    and 100 test images."""
    train, _, _ = load_split_cached(data_root / "cifar10" / "train", cache_dir, "RGB")
    test, _, _ = load_split_cached(data_root / "cifar10" / "test", cache_dir, "RGB")
    white = (train.images == 255).flatten(1).float().mean(1)
    saturated = white.topk(8).indices
    assert float(white[saturated[0]]) > 0.5  # a white-background image is really in the set
    idx = balanced(train.labels, PER_CLASS, seed=0)
    idx = torch.cat([idx[~torch.isin(idx, saturated)], saturated])
    tidx = balanced(test.labels, 10, seed=1)
    return {
        "train": (train.images[idx], train.labels[idx]),
        "saturated": (train.images[saturated], train.labels[saturated]),
        "test": (test.images[tidx], test.labels[tidx]),
    }


def stored_psnr(protected: torch.Tensor, clean: torch.Tensor) -> float:
    """Mean per-image PSNR as the export measures it (ImageQuality on uint8 images)."""
    q = ImageQuality()
    q.update(protected, clean)
    return float(q.compute()["psnr"])


def noise(protected: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) int16 stored difference in 8-bit levels."""
    return protected.to(torch.int16) - clean.to(torch.int16)


def unclipped(protected: torch.Tensor) -> torch.Tensor:
    """Values the clip at 0 / 255 cannot have touched."""
    return (protected > 0) & (protected < 255)


def grayscale_resized(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 1, H, W) uint8: channel mean, resized bilinearly."""
    gray = images.float().mean(dim=1, keepdim=True)
    return F.interpolate(gray, size=size, mode="bilinear", align_corners=False).round().byte()


# ----------------------------------------------------------------------------------------------
# Registry and grid config
# ----------------------------------------------------------------------------------------------


def test_registry_builds_each_control_with_its_parameters():
    cases = {
        "classwise_noise": (ClasswiseNoiseMethod, {"psnr": 30.0, "pattern": "lowfreq", "grid": 4}),
        "samplewise_noise": (SamplewiseNoiseMethod, {"psnr": 35.0}),
        "ops": (OnePixelShortcutMethod, {"num_classes": 10}),
    }
    for kind, (cls, params) in cases.items():
        assert kind in METHODS
        method = create_method({"kind": kind, **params}, [torch.nn.Identity()], seed=3)
        assert type(method) is cls and method.name == kind
        assert method.reversible is False and method.protects_unseen is True
        cfg = method.config()
        assert cfg["name"] == kind and cfg["seed"] == 3
        for key, value in params.items():
            assert cfg[key] == value
    noise_cfg = create_method({"kind": "classwise_noise"}).config()
    assert {"psnr", "pattern", "grid", "num_classes", "scale", "psnr_fit"} <= set(noise_cfg)
    assert noise_cfg["psnr"] == 33.0 and noise_cfg["scale"] is None  # not fitted yet


def test_grid_rows_of_the_controls_validate():
    rows = {
        "classwise": {"kind": "classwise_noise", "psnr": 33.0},
        "classwise_lf": {"kind": "classwise_noise", "psnr": 33.0, "pattern": "lowfreq"},
        "samplewise": {"kind": "samplewise_noise", "psnr": 33.0},
        "ops": {"kind": "ops"},
    }
    cfg = load_grid_config(REPO / "experiments" / "main" / "quick.yaml")
    assert validate_grid_config({**cfg, "rows": rows}) == []
    bad = {"bad": {"kind": "classwise_noise", "eps": 8}}
    problems = validate_grid_config({**cfg, "rows": bad})
    assert problems == ["rows.bad: unknown argument 'eps' for ClasswiseNoiseMethod"]


# ----------------------------------------------------------------------------------------------
# PSNR calibration
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ClasswiseNoiseMethod, SamplewiseNoiseMethod])
@pytest.mark.parametrize("target", [33.0, 40.0])
def test_noise_reaches_target_psnr_on_real_images(cifar, cls, target):
    images, labels = cifar["train"]
    method = cls(psnr=target, seed=0, batch_size=64)
    method.fit(images, labels)
    protected = method.protect(images, labels)
    psnr = stored_psnr(protected, images)
    assert abs(psnr - target) <= TOL_DB, psnr
    assert method.config()["psnr_fit"] == pytest.approx(psnr, abs=1e-4)
    # The saturated images clip: they end up less distorted than the average image.
    per_image = psnr_db(protected, images)
    assert float(per_image[-8:].mean()) > float(per_image[:-8].mean()) + 0.5


def test_calibration_measures_clipping_on_saturated_images(cifar):
    images, labels = cifar["saturated"]
    method = ClasswiseNoiseMethod(psnr=33.0, seed=1)
    method.fit(images, labels)
    assert abs(stored_psnr(method.protect(images, labels), images) - 33.0) <= TOL_DB
    # A scale from the unclipped formula (MSE = scale^2 / 3 for uniform noise) falls short:
    # clipping hides part of the noise, so the calibrated scale is clearly larger.
    formula = 255.0 * 10 ** (-33.0 / 20) * math.sqrt(3.0)
    assert method.scale > 1.1 * formula


def test_calibration_fails_clearly_when_rounding_is_too_coarse():
    one_value = torch.full((1, 1, 1, 1), 100, dtype=torch.uint8)
    with pytest.raises(ValueError, match="psnr"):
        calibrate_noise_scale(one_value, lambda sl: torch.ones(1, 1, 1, 1), 33.0)


# ----------------------------------------------------------------------------------------------
# Patterns
# ----------------------------------------------------------------------------------------------


def test_classwise_pattern_is_shared_within_a_class_and_differs_across_classes(cifar):
    images, labels = cifar["train"]
    method = ClasswiseNoiseMethod(psnr=33.0, seed=0)
    method.fit(images, labels)
    protected = method.protect(images, labels)
    diff, free = noise(protected, images), unclipped(protected)
    reference = {}
    for c in range(NUM_CLASSES):
        members = (labels == c).nonzero().squeeze(1)
        first = members[0]
        for i in members[1:]:
            both = free[first] & free[i]
            assert both.float().mean() > 0.5
            assert torch.equal(diff[i][both], diff[first][both]), f"class {c}, image {int(i)}"
        reference[c] = (diff[first], free[first])
    for a in range(NUM_CLASSES):
        for b in range(a + 1, NUM_CLASSES):
            both = reference[a][1] & reference[b][1]
            differ = (reference[a][0] != reference[b][0])[both].float().mean()
            assert differ > 0.5, (a, b)
    # Unseen test images of a class get their class's pattern too.
    test_images, test_labels = cifar["test"]
    test_protected = method.protect(test_images, test_labels)
    test_diff, test_free = noise(test_protected, test_images), unclipped(test_protected)
    for j in range(len(test_images)):
        c = int(test_labels[j])
        both = test_free[j] & reference[c][1]
        assert torch.equal(test_diff[j][both], reference[c][0][both])


def test_samplewise_patterns_differ_per_image_and_for_unseen_images(cifar):
    images, labels = cifar["train"]
    method = SamplewiseNoiseMethod(psnr=33.0, seed=0)
    method.fit(images, labels)
    protected = method.protect(images, labels)
    diff, free = noise(protected, images), unclipped(protected)
    for i in range(10):
        both = free[i] & free[i + 1]
        assert (diff[i] != diff[i + 1])[both].float().mean() > 0.5
    # Same class, different images: no shared pattern either.
    members = (labels == labels[0]).nonzero().squeeze(1)
    both = free[members[0]] & free[members[1]]
    assert (diff[members[0]] != diff[members[1]])[both].float().mean() > 0.5
    # Protecting the fitted set again gives the same patterns; other images draw new ones.
    assert torch.equal(method.protect(images, labels), protected)
    test_images, test_labels = cifar["test"]
    test_protected = method.protect(test_images, test_labels)
    test_diff, test_free = noise(test_protected, test_images), unclipped(test_protected)
    both = test_free[0] & free[0]
    assert (test_diff[0] != diff[0])[both].float().mean() > 0.5
    assert abs(stored_psnr(test_protected, test_images) - 33.0) < 1.0  # same scale


def test_noise_is_deterministic_for_a_seed(cifar):
    images, labels = cifar["train"]
    for cls in (ClasswiseNoiseMethod, SamplewiseNoiseMethod):
        outs = []
        for seed, batch_size in ((5, 256), (5, 37), (6, 256)):
            method = cls(psnr=33.0, seed=seed, batch_size=batch_size)
            method.fit(images, labels)
            outs.append(method.protect(images, labels))
        assert torch.equal(outs[0], outs[1]), cls.name  # batching changes nothing
        assert not torch.equal(outs[0], outs[2]), cls.name


def test_lowfreq_pattern_is_smoother_than_uniform(cifar):
    images, labels = cifar["train"]
    smooth = {}
    for pattern in ("uniform", "lowfreq"):
        method = ClasswiseNoiseMethod(psnr=33.0, pattern=pattern, seed=0)
        method.fit(images, labels)
        protected = method.protect(images, labels)
        assert abs(stored_psnr(protected, images) - 33.0) <= TOL_DB
        p = method.class_patterns(tuple(images.shape[1:]))
        # Mean squared difference of horizontal neighbours relative to the pattern's power.
        smooth[pattern] = float((p[..., 1:] - p[..., :-1]).pow(2).mean() / p.pow(2).mean())
    assert smooth["lowfreq"] < 0.2 * smooth["uniform"]


# ----------------------------------------------------------------------------------------------
# One-pixel shortcut
# ----------------------------------------------------------------------------------------------


def ops_score_reference(images: np.ndarray, row: int, col: int, colour: np.ndarray) -> float:
    """The OPS objective straight from its definition: mean / std of |colour - x_p|."""
    d = np.abs(colour[None, :] - images[:, :, row, col] / 255.0)
    return float(np.mean(d) / np.std(d))


def test_ops_changes_one_pixel_position_per_class(cifar):
    images, labels = cifar["train"]
    method = OnePixelShortcutMethod()
    method.fit(images, labels)
    protected = method.protect(images, labels)
    changed = (protected != images).any(dim=1)  # (N, H, W)
    assert (changed.flatten(1).sum(1) <= 1).all()
    pairs = set()
    for c in range(NUM_CLASSES):
        members = labels == c
        where = changed[members].any(dim=0).nonzero().tolist()
        row, col = method.positions[c]
        assert where == [[row, col]], c
        colour = torch.tensor(method.colours[c], dtype=torch.uint8)
        assert set(method.colours[c]) <= {0, 255}
        assert (protected[members][:, :, row, col] == colour).all()
        pairs.add((row, col, tuple(method.colours[c])))
    assert len(pairs) == NUM_CLASSES  # no two classes share a (position, colour)
    # Unseen test images of a class get the same pixel.
    test_images, test_labels = cifar["test"]
    test_protected = method.protect(test_images, test_labels)
    for j in range(len(test_images)):
        row, col = method.positions[int(test_labels[j])]
        mask = torch.ones(test_images.shape[2:], dtype=torch.bool)
        mask[row, col] = False
        assert torch.equal(test_protected[j][:, mask], test_images[j][:, mask])


def test_ops_picks_the_papers_criterion(cifar):
    images, labels = cifar["train"]
    method = OnePixelShortcutMethod()
    method.fit(images, labels)
    x = images.numpy().astype(np.float64)
    colours = [np.array([(v >> 2) & 1, (v >> 1) & 1, v & 1], dtype=np.float64) for v in range(8)]
    for c in (0, 3, 7):
        cls_x = x[(labels == c).numpy()]
        row, col = method.positions[c]
        colour = np.array(method.colours[c]) / 255.0
        best = ops_score_reference(cls_x, row, col, colour)
        assert method.scores[c] == pytest.approx(best, rel=1e-9)
        # No other position or colour scores higher (for the first class nothing is taken).
        if c == 0:
            for r in range(32):
                for q in range(32):
                    for col_v in colours:
                        assert ops_score_reference(cls_x, r, q, col_v) <= best + 1e-9


def test_ops_is_deterministic(cifar):
    images, labels = cifar["train"]
    a, b = OnePixelShortcutMethod(batch_size=256), OnePixelShortcutMethod(batch_size=33)
    a.fit(images, labels)
    b.fit(images, labels)
    assert a.config()["positions"] == b.config()["positions"]
    assert torch.equal(a.protect(images, labels), b.protect(images, labels))


# ----------------------------------------------------------------------------------------------
# Other datasets: grayscale, other sizes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(24, 40), (48, 48)])
def test_grayscale_and_other_sizes(cifar, size):
    images, labels = cifar["train"]
    gray = grayscale_resized(images, size)
    for method in (
        ClasswiseNoiseMethod(psnr=33.0),
        ClasswiseNoiseMethod(psnr=33.0, pattern="lowfreq", grid=5),
        SamplewiseNoiseMethod(psnr=33.0),
    ):
        method.fit(gray, labels)
        protected = method.protect(gray, labels)
        assert protected.shape == gray.shape and protected.dtype == torch.uint8
        assert abs(stored_psnr(protected, gray) - 33.0) <= TOL_DB, method.config()
    ops = OnePixelShortcutMethod()
    ops.fit(gray, labels)
    protected = ops.protect(gray, labels)
    assert protected.shape == gray.shape
    assert ((protected != gray).flatten(1).sum(1) <= 1).all()
    assert all(colour in ([0], [255]) for colour in ops.colours)
    assert all(r < size[0] and c < size[1] for r, c in ops.positions)


# ----------------------------------------------------------------------------------------------
# Bad arguments
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"psnr": 5.0}, "psnr"),
        ({"psnr": 90}, "psnr"),
        ({"psnr": "33"}, "psnr"),
        ({"pattern": "gaussian"}, "pattern"),
        ({"grid": 0}, "grid"),
        ({"num_classes": 0}, "num_classes"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
@pytest.mark.parametrize("cls", [ClasswiseNoiseMethod, SamplewiseNoiseMethod])
def test_bad_noise_arguments_name_the_parameter(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


def test_bad_labels_and_calls_name_the_problem(cifar):
    images, labels = cifar["train"]
    x, y = images[:20], labels[:20]
    for cls in (ClasswiseNoiseMethod, SamplewiseNoiseMethod, OnePixelShortcutMethod):
        with pytest.raises(RuntimeError, match="fit"):
            cls().protect(x, y)
        with pytest.raises(ValueError, match="labels"):
            cls(num_classes=10).fit(x, torch.where(y == y[0], 10, y))
        with pytest.raises(ValueError, match="labels"):
            cls().fit(x, torch.where(y == y[0], -1, y))
        with pytest.raises(ValueError, match="uint8"):
            cls().fit(x.float(), y)
    for cls in (ClasswiseNoiseMethod, OnePixelShortcutMethod):
        method = cls()
        method.fit(images, labels)
        with pytest.raises(ValueError, match="labels"):
            method.protect(x, torch.full_like(y, NUM_CLASSES))
    with pytest.raises(ValueError, match="num_classes"):
        OnePixelShortcutMethod(num_classes=-1)
    ops = OnePixelShortcutMethod(num_classes=NUM_CLASSES + 1)
    ops.fit(images, labels)
    assert ops.positions[NUM_CLASSES] is None
    with pytest.raises(ValueError, match=f"class {NUM_CLASSES}"):
        ops.protect(x, torch.full_like(y, NUM_CLASSES))


def test_ops_on_a_constant_pixel_scores_inf_and_writes_json():
    import json

    images = torch.full((6, 3, 8, 8), 128, dtype=torch.uint8)
    images[:, :, 1:, :] = torch.randint(
        1, 255, (6, 3, 7, 8), generator=torch.Generator().manual_seed(0)
    ).byte()
    labels = torch.zeros(6, dtype=torch.long)
    method = OnePixelShortcutMethod()
    method.fit(images, labels)
    # Row 0 is the same grey in every image: every colour changes it by the same amount.
    assert method.positions[0][0] == 0 and method.scores[0] == math.inf
    assert json.loads(json.dumps(method.config(), allow_nan=False))["scores"] == ["inf"]
