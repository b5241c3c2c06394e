"""Adaptive pirate defences: spec grammar, class-pattern removal, learned inverse, UEraser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from raeg_pl.config import load_grid_config, validate_grid_config
from raeg_pl.data.augment import mix_batch, ueraser
from raeg_pl.data.datamodule import CIFAR10_CLASSES
from raeg_pl.defenses.ops import gaussian_blur
from raeg_pl.defenses.pirate import (
    PIRATE_DEFENSES,
    InverseNet,
    class_pattern_removal,
    class_patterns,
    fit_inverse,
    learned_inverse_uint8,
    parse_pirate_defense,
    remove_class_patterns_uint8,
)
from raeg_pl.lit.classifier import ClassifierLitModule
from raeg_pl.utils.quantize import from_uint8, to_uint8

REPO = Path(__file__).resolve().parents[2]
MAIN_QUICK = REPO / "experiments" / "main" / "quick.yaml"
CLASSES = CIFAR10_CLASSES


@pytest.fixture(scope="module")
def cifar(data_root) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 100 real CIFAR-10 training images of each class: (1000, 3, 32, 32) uint8."""
    images, labels = [], []
    for c, name in enumerate(CLASSES):
        for path in sorted((data_root / "cifar10" / "train" / name).iterdir())[:100]:
            with Image.open(path) as img:
                images.append(torch.from_numpy(np.asarray(img.convert("RGB"))).permute(2, 0, 1))
            labels.append(c)
    return torch.stack(images), torch.tensor(labels)


def _pattern(seed: int, amplitude: float, blur: float | None = None) -> torch.Tensor:
    """A class-wise pattern (10, 3, 32, 32), uniform in +-amplitude/255 (optionally blurred)."""
    g = torch.Generator().manual_seed(seed)
    pattern = (torch.rand(10, 3, 32, 32, generator=g) * 2 - 1) * amplitude / 255
    return pattern if blur is None else gaussian_blur(pattern, blur)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(-10 * torch.log10((from_uint8(a) - from_uint8(b)).pow(2).mean()))


# ----------------------------------------------------------------- spec grammar
NEW_SPECS = {
    "classpattern": ("classpattern:sigma=2", "labelled"),
    "classpattern:sigma=1.5": ("classpattern:sigma=1.5", "labelled"),
    "classpattern:3": ("classpattern:sigma=3", "labelled"),
    "inverse:k=100": ("inverse:k=100,steps=300", "paired"),
    "inverse:K=1000,steps=50": ("inverse:k=1000,steps=50", "paired"),
    # restarts came later: at its default the canonical spec (and so every earlier recipe)
    # is unchanged.
    "inverse:k=100,restarts=1": ("inverse:k=100,steps=300", "paired"),
    "inverse:k=100,restarts=4": ("inverse:k=100,steps=300,restarts=4", "paired"),
    "adv_train:eps=8,steps=4": ("adv_train:eps=8,steps=4", "training"),
    "ueraser": ("ueraser", "training"),
    "UEraser": ("ueraser", "training"),
}


@pytest.mark.parametrize("spec", sorted(NEW_SPECS))
def test_every_new_spec_parses_and_round_trips(spec):
    canonical, kind = NEW_SPECS[spec]
    d = parse_pirate_defense(spec)
    assert str(d) == canonical and d.kind == kind
    assert parse_pirate_defense(str(d)) == d
    assert (d.data is None) == (kind == "training")
    assert bool(d.model) == (kind == "training")


def test_what_each_kind_changes():
    assert parse_pirate_defense("none").kind == "none"
    jpeg = parse_pirate_defense("jpeg:10")
    assert jpeg.kind == "image" and jpeg.data == "jpeg:q=10" and jpeg.model == {}
    assert parse_pirate_defense("adv_train:eps=8,steps=4").model == {
        "adv_train_eps": 8.0,
        "adv_train_steps": 4,
    }
    assert parse_pirate_defense("ueraser").model == {"train_augment": "ueraser"}
    assert set(PIRATE_DEFENSES) == {"adv_train", "classpattern", "inverse", "ueraser"}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("classpatern", "unknown defence 'classpatern'"),
        ("classpattern:sigma=0", "bad 'sigma'"),
        ("classpattern:s=2", "unknown parameter 's'"),
        ("classpattern:", "empty argument"),
        ("inverse:k=0", "bad 'k'"),
        ("inverse:k=1.5", "not an integer"),
        ("inverse:k=10,k=20", "'k' given twice"),
        ("inverse:steps=10,5", "unexpected value '5'"),
        ("ueraser:1", "takes no parameters"),
        ("adv_train:epz=3", "unknown parameter 'epz'"),
        ("adv_train:eps=-1", "bad 'eps'"),
    ],
)
def test_a_malformed_spec_is_rejected_naming_it(spec, message):
    with pytest.raises(ValueError) as err:
        parse_pirate_defense(spec)
    assert f"pirate defence {spec!r}" in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("spec", ["classpatern", "inverse:kk=3", "uerasr", "inverse:k=0"])
def test_validate_grid_config_names_a_misspelt_pirate_defence(spec):
    cfg = load_grid_config(MAIN_QUICK, [f"pirate_defenses=[none, ueraser, '{spec}']"])
    problems = validate_grid_config(cfg)
    assert len(problems) == 1 and problems[0].startswith(f"pirate_defenses: {spec!r}")
    assert "classpattern" in problems[0] or "inverse" in problems[0]


# ----------------------------------------------------------------- class-pattern removal
@pytest.mark.data
def test_class_pattern_removal_removes_an_added_class_pattern(cifar):
    images, labels = cifar
    pattern = _pattern(0, 8)[labels]
    protected = to_uint8(from_uint8(images) + pattern)
    cleaned = remove_class_patterns_uint8(protected, labels, 10)

    def corr(x: torch.Tensor) -> float:
        r = from_uint8(x) - from_uint8(images)
        return float((r * pattern).sum() / (r.norm() * pattern.norm()))

    assert corr(protected) > 0.95
    assert corr(cleaned) < 0.25
    assert _psnr(cleaned, images) > _psnr(protected, images) + 3
    # Clean images lose only their class means' fine detail: nearly unchanged.
    assert _psnr(remove_class_patterns_uint8(images, labels, 10), images) > 36


@pytest.mark.data
def test_patterns_come_from_the_fitted_images_and_apply_to_all(cifar):
    images, labels = cifar
    fit = torch.arange(0, 1000, 2)
    out = remove_class_patterns_uint8(images, labels, 10, 2.0, fit_indices=fit)
    patterns = class_patterns(from_uint8(images[fit]), labels[fit], 10, 2.0)
    expected = to_uint8(from_uint8(images) - patterns[labels])
    assert (out.int() - expected.int()).abs().max() <= 1
    assert not torch.equal(out, remove_class_patterns_uint8(images, labels, 10, 2.0))


@pytest.mark.data
def test_differentiable_class_pattern_removal_matches_the_real_one(cifar):
    images, labels = cifar
    x = from_uint8(images).requires_grad_(True)
    soft = class_pattern_removal(x, labels, 10)
    real = remove_class_patterns_uint8(images, labels, 10)
    diff = (to_uint8(soft).int() - real.int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() > 0.999
    weights = torch.randn_like(soft)
    (soft * weights).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_batch_class_pattern_removal_is_linear_with_exact_gradients():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(6, 3, 8, 8, generator=g), torch.rand(6, 3, 8, 8, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 1])
    f = lambda x: class_pattern_removal(x, labels, 3, 1.0)  # noqa: E731
    assert torch.allclose(f(2 * a - 0.5 * b), 2 * f(a) - 0.5 * f(b), atol=1e-5)
    x = torch.rand(4, 2, 6, 6, dtype=torch.float64, generator=g).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: class_pattern_removal(x, torch.tensor([0, 1, 1, 0]), 2, 1.0), (x,)
    )
    # A class without images has a zero pattern; its images would pass unchanged.
    assert class_patterns(a, labels, 4, 1.0)[3].abs().max() == 0


# ----------------------------------------------------------------- learned inverse
@pytest.mark.data
def test_learned_inverse_beats_the_identity_on_held_out_images(cifar):
    images, labels = cifar
    # An invertible corruption: a small blur plus a fixed class-wise pattern.
    corrupted = to_uint8(gaussian_blur(from_uint8(images), 0.6) + _pattern(1, 24, 1.0)[labels])
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(images), generator=g)
    pairs, held = order[:100], order[100:]
    restored, stats = learned_inverse_uint8(
        corrupted, labels, 10, pairs, images[pairs], steps=120, seed=0
    )
    assert restored.dtype == torch.uint8 and restored.shape == images.shape
    assert stats["pairs"] == 100 and stats["pair_mse_after"] < stats["pair_mse_before"]
    before, after = _psnr(corrupted[held], images[held]), _psnr(restored[held], images[held])
    assert after > before + 1.0, (before, after)


def test_untrained_inverse_is_the_identity_and_needs_labels():
    x = torch.rand(2, 3, 8, 8)
    net = InverseNet(3, num_classes=2, image_size=(8, 8))
    assert torch.equal(net(x, torch.tensor([0, 1])), x)
    with pytest.raises(ValueError, match="labels"):
        net(x)


def test_same_seed_same_inverse():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.arange(20) % 2
    clean = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8, generator=g)
    runs = [
        learned_inverse_uint8(images, labels, 2, torch.arange(5), clean, steps=3, seed=s)[0]
        for s in (0, 0, 1)
    ]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_restarts_go_on_with_the_initialisation_that_fits_the_pairs_best():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(30, 226, (64, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.arange(64) % 4
    shift = torch.tensor([-20, -8, 8, 20]).view(4, 1, 1, 1)
    protected = (clean.int() + shift[labels]).clamp(0, 255).to(torch.uint8)

    def mse(net):
        with torch.no_grad():
            return F.mse_loss(net(from_uint8(protected), labels), from_uint8(clean)).item()

    one = fit_inverse(protected, clean, labels, 4, steps=60, seed=0)
    assert one.restart_pair_mse == []
    same = fit_inverse(protected, clean, labels, 4, steps=60, seed=0, restarts=1)
    assert all(
        torch.equal(a, b) for a, b in zip(one.state_dict().values(), same.state_dict().values())
    )
    best = fit_inverse(protected, clean, labels, 4, steps=60, seed=0, restarts=3)
    trials = best.restart_pair_mse
    assert len(trials) == 3 and len(set(trials)) == 3  # three different initialisations
    # The kept one went on from the best trial (6 of 60 steps) and ends below it.
    assert mse(best) < min(trials) < mse(InverseNet(3, 4, (8, 8)))
    _, stats = learned_inverse_uint8(
        protected, labels, 4, torch.arange(64), clean, steps=20, restarts=2
    )
    assert stats["restarts"] == 2 and len(stats["restart_pair_mse"]) == 2
    with pytest.raises(ValueError, match="restarts"):
        fit_inverse(protected, clean, labels, 4, steps=5, restarts=0)


# ----------------------------------------------------------------- UEraser
def test_ueraser_changes_batches_keeps_shapes_ranges_and_soft_labels_sum_to_one():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 32, 32)
    labels = torch.arange(16) % 10
    out, targets = ueraser(x, labels, 10)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().mean() > 0.05
    assert targets.shape == (16, 10) and torch.allclose(targets.sum(1), torch.ones(16))
    assert (targets >= 0).all()
    gray, _ = ueraser(torch.rand(4, 1, 32, 32), torch.arange(4), 10)
    assert gray.shape == (4, 1, 32, 32)


@pytest.mark.parametrize("cutmix", [False, True])
def test_mixup_and_cutmix_mix_targets_with_the_images_weight(cutmix):
    g = torch.Generator().manual_seed(3)
    x = torch.zeros(4, 1, 16, 16)
    x[0] = 1.0  # image 0 is white, its partner (image 3) black
    targets = torch.eye(4)
    out, soft = mix_batch(x, targets, cutmix=cutmix, generator=g)
    assert torch.allclose(soft.sum(1), torch.ones(4))
    # The share of image 0 in the mixed image 0 is its target weight.
    assert torch.isclose(out[0].mean(), soft[0, 0], atol=1e-6)
    assert torch.isclose(soft[0, 0] + soft[0, 3], torch.tensor(1.0))


def test_ueraser_training_step_uses_soft_labels_and_passes_gradients():
    torch.manual_seed(0)
    lit = ClassifierLitModule(arch="resnet_tiny_cifar", train_augment="ueraser")
    lit.log = lambda *a, **k: None
    lit.train()
    loss = lit.training_step((torch.rand(8, 3, 32, 32), torch.arange(8) % 10), 0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in lit.model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="train_augment"):
        ClassifierLitModule(train_augment="strong")
    with pytest.raises(ValueError, match="do not combine"):
        ClassifierLitModule(train_augment="ueraser", adv_train_eps=8)


# ----------------------------------------------------------------- grid runs
TINY = [
    "data.train_per_class=12",
    "data.val_per_class=4",
    "data.test_per_class=6",
    "data.batch_size=32",
    "pirate.max_epochs=1",
    "pirate.data.val_per_class=2",
    "archs=[resnet]",
    "heldout=[]",
    "seeds=[0]",
    "rows={}",
    "eval_defenses=[none]",
    "reuse_from=null",
    "pirates={resnet: {model: {arch: resnet_tiny_cifar}}}",
    "pirate_defenses=[classpattern, 'inverse:k=10,steps=3', 'adv_train:eps=8,steps=1', ueraser]",
]


@pytest.mark.data
def test_a_tiny_grid_trains_a_pirate_with_each_new_defence(data_root, cache_dir, tmp_path):
    from raeg_pl.cli import main

    run = tmp_path / "grid"
    data = [f"data.data_dir={data_root}", f"data.cache_dir={cache_dir}"]
    args = ["grid", "--config", str(MAIN_QUICK), "--run_dir", str(run), *TINY, *data]
    assert main(args) == 0  # its build check applies or steps every defence first
    leaves = {
        "classpattern": "classpattern",
        "inverse:k=10,steps=3": "inverse_k10_steps3",
        "adv_train:eps=8,steps=1": "adv_train_eps8_steps1",
        "ueraser": "ueraser",
    }
    for defense, leaf in leaves.items():
        stage = run / "pirates" / "clean" / "resnet" / leaf / "seed0"
        res = json.loads((stage / "results.json").read_text())
        assert res["grid"]["defense"] == defense and 0.0 <= res["test_acc"] <= 1.0
        assert res["splits"]["train"] == 120 - 20
        recipe = json.loads((stage / "recipe.json").read_text())["recipe"]
        model = recipe["spec"]["model"]
        assert (model.get("train_augment") == "ueraser") == (defense == "ueraser")
        assert (model.get("adv_train_eps") == 8.0) == defense.startswith("adv_train")
        # The learned inverse's fit and how close it came are kept with the pirate's results.
        stats = res.get("defense_stats", {})
        assert (stats.get("pairs"), stats.get("heldout_images")) == (
            (10, 100 - 10) if leaf.startswith("inverse") else (None, None)
        )
    # classpattern and inverse record their canonical spec, defaults included.
    for leaf, canonical in (
        ("inverse_k10_steps3", "inverse:k=10,steps=3"),
        ("classpattern", "classpattern:sigma=2"),
    ):
        recorded = json.loads(
            (run / "pirates/clean/resnet" / leaf / "seed0/recipe.json").read_text()
        )
        assert recorded["recipe"]["defense"] == canonical


def _paired_datamodule(tmp_path: Path, cache_dir: Path, val_per_class: int, defense: str):
    """A data module on ``<tmp>/ds`` training on ``<tmp>/protected/train`` with ``defense``,
    whose clean originals are in ``<tmp>/clean/train``."""
    from raeg_pl.data.datamodule import ImageClassificationDataModule

    return ImageClassificationDataModule(
        dataset="ds",
        data_dir=str(tmp_path),
        cache_dir=str(cache_dir),
        val_per_class=val_per_class,
        train_dir=str(tmp_path / "protected" / "train"),
        train_defense=defense,
        clean_train_dir=str(tmp_path / "clean" / "train"),
        download=False,
    )


@pytest.mark.data
def test_inverse_fails_clearly_when_a_leaked_pair_has_no_clean_original(
    data_root, cache_dir, tmp_path
):
    from raeg_pl.data.datamodule import DatasetError

    root = tmp_path / "ds"
    train, clean = tmp_path / "protected" / "train", tmp_path / "clean" / "train"
    for folder, n in ((train, 6), (clean, 3), (root / "train", 2), (root / "test", 2)):
        for name in ("airplane", "cat"):
            (folder / name).mkdir(parents=True)
            for src in sorted((data_root / "cifar10" / "train" / name).iterdir())[:n]:
                Image.open(src).save(folder / name / (src.stem + ".png"))
    dm = _paired_datamodule(tmp_path, cache_dir, 1, "inverse:k=10,steps=1")
    with pytest.raises(DatasetError, match=r"no clean original of \d leaked pair"):
        dm.setup()


@pytest.mark.data
def test_inverse_records_how_close_it_brings_the_pirates_images(data_root, cache_dir, tmp_path):
    """The datamodule reports the inverse's PSNR on the leaked pairs and on the other
    training images, before and after: the evaluator's view of how much it undid."""
    from raeg_pl.metrics.image_quality import psnr_db

    root = tmp_path / "ds"
    train, clean = tmp_path / "protected" / "train", tmp_path / "clean" / "train"
    for name in ("airplane", "cat"):
        for folder in (train, clean, root / "train", root / "test"):
            (folder / name).mkdir(parents=True)
        sources = sorted((data_root / "cifar10" / "train" / name).iterdir())[:30]
        for k, src in enumerate(sources):
            img = np.asarray(Image.open(src).convert("RGB"))
            Image.fromarray(img).save(clean / name / (src.stem + ".png"))
            # A class-wise brightness shift: an inverse with class offsets undoes it.
            shift = 24 if name == "cat" else -24
            Image.fromarray(np.clip(img.astype(int) + shift, 0, 255).astype(np.uint8)).save(
                train / name / (src.stem + ".png")
            )
            if k < 2:
                Image.fromarray(img).save(root / "train" / name / (src.stem + ".png"))
                Image.fromarray(img).save(root / "test" / name / (src.stem + ".png"))
    dm = _paired_datamodule(tmp_path, cache_dir, 5, "inverse:k=10,steps=150")
    dm.setup()
    stats = dm.train_defense_stats
    assert stats["pairs"] == 10 and stats["heldout_images"] == 50 - 10
    assert stats["heldout_psnr_after"] > stats["heldout_psnr_before"] + 3, stats
    assert stats["pair_psnr_after"] > stats["pair_psnr_before"] + 3, stats

    # The "before" figure is the shift's own PSNR: measured here on all 50 training images
    # (the held-out 40 are a subset of them).
    def load(folder):
        return torch.stack(
            [
                torch.from_numpy(np.asarray(Image.open(folder / f))).permute(2, 0, 1)
                for f in dm.train_files
            ]
        )

    shifted = float(psnr_db(load(train), load(clean)).mean())
    assert abs(stats["heldout_psnr_before"] - shifted) < 1.0, (stats, shifted)
