"""The reversible-data-hiding baseline: exact recovery, tamper evidence, real protection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raeg_pl.data import ImageClassificationDataModule
from raeg_pl.methods import create_method
from raeg_pl.methods.rdh import (
    FALLBACK_THRESHOLD,
    HEADER_BITS,
    RDHError,
    ReversibleDataHidingMethod,
    decode_perturbation,
    embed_bits,
    encode_perturbation,
    extract_bits,
    perturbation_code_length,
    reveal_perturbation,
)
from raeg_pl.methods.rdh.message import _reveal_at
from raeg_pl.methods.rdh.pee import _geometry, _orientation, _predict
from raeg_pl.metrics import PSNR_MAX_DB, psnr_db
from raeg_pl.models.classifier import create_classifier


def tiny_surrogate(channels: int = 3, seed: int = 0) -> nn.Module:
    """A random convolutional classifier that takes images of any size (fast PGD target)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(channels, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(16, 10),
        ).eval()


def rdh(channels: int = 3, **kwargs) -> ReversibleDataHidingMethod:
    """The method against a tiny random surrogate: exercises hiding, not attack strength."""
    return ReversibleDataHidingMethod(surrogates=[tiny_surrogate(channels)], **kwargs)


@pytest.fixture(scope="module")
def cifar(data_root, cache_dir) -> ImageClassificationDataModule:
    """1,000 real CIFAR-10 training images (100 per class) and 200 test images (20 per class)."""
    dm = ImageClassificationDataModule(
        data_dir=str(data_root),
        cache_dir=str(cache_dir),
        download=False,
        train_per_class=100,
        val_per_class=10,
        test_per_class=20,
    )
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def protected_cifar(cifar):
    """The 200 test images, their protected copies and the method that protected them."""
    method = rdh(batch_size=100)
    x, y = cifar.test_set.images, cifar.test_set.labels
    return x, y, method.protect(x, y), method


# ------------------------------------------------------------------------------ coding
def test_perturbation_code_round_trips_and_predicts_its_length():
    rng = np.random.default_rng(0)
    n = 3072
    cases = [np.zeros(n, np.int16), np.full(n, -6, np.int16), np.full(n, 255, np.int16)]
    for k in (1, 2, 17, 300, 3071):
        d = np.zeros(n, np.int16)
        pos = rng.choice(n, k, replace=False)
        d[pos] = rng.choice([-255, -6, -5, -1, 1, 3, 6, 6, 6, 6, 200], k)
        cases.append(d)
    for d in cases:
        code = encode_perturbation(d)
        nz = np.flatnonzero(d)
        assert len(code) == perturbation_code_length(nz, np.abs(d[nz]).astype(np.int64))
        assert np.array_equal(decode_perturbation(code, n), d)
    # Values at the ball's edge, as PGD leaves them, cost about 9 bits each at 3 % density.
    d = np.zeros(n, np.int16)
    d[rng.choice(n, 100, replace=False)] = rng.choice([-6, 6], 100)
    assert len(encode_perturbation(d)) < 100 * 10


def test_malformed_codes_raise_rdh_error():
    d = np.zeros(64, np.int16)
    d[[3, 40]] = [5, -2]
    code = encode_perturbation(d)
    with pytest.raises(RDHError):
        decode_perturbation(code[:-3], 64)  # truncated
    with pytest.raises(RDHError):
        decode_perturbation(code, 20)  # a position beyond the image


def _edge_images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    ii, jj = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    gray = np.clip(ii * 8 + rng.integers(-3, 4, (32, 32)), 0, 255).astype(np.uint8)
    half = np.where(jj < 16, 0, 255).astype(np.uint8)
    saturated = np.clip(rng.normal(240, 30, (3, 32, 32)), 0, 255).astype(np.uint8)
    # A smooth ramp clipped to 0 and 255 over a third of the image each, with mild noise.
    ramp = np.clip(jj * 24 - 256 + rng.integers(-2, 3, (32, 32)), 0, 255).astype(np.uint8)
    return {
        "uniform0": np.zeros((3, 32, 32), np.uint8),
        "uniform255": np.full((3, 32, 32), 255, np.uint8),
        "uniform128": np.full((3, 32, 32), 128, np.uint8),
        "half_black_half_white": np.stack([half] * 3),
        "checker_0_255": np.stack([((ii + jj) % 2 * 255).astype(np.uint8)] * 3),
        "saturated_noise": saturated,
        "clipped_ramp": np.stack([ramp, ramp.T, 255 - ramp]),
        "near_ends": rng.choice(np.array([0, 1, 2, 253, 254, 255], np.uint8), (3, 32, 32)),
        "grayscale_like_rgb": np.stack([gray] * 3),
        "one_channel": gray[None],
        "noise": rng.integers(0, 256, (3, 32, 32), dtype=np.uint8),
        "odd_7x5": rng.integers(100, 110, (3, 7, 5), dtype=np.uint8),
        "odd_33x31": np.clip(ii[:, :31].repeat(2, 0)[:33] * 4, 0, 255)
        .astype(np.uint8)[None]
        .repeat(3, 0),
        "row_1x9": np.full((3, 1, 9), 7, np.uint8),
        "tiny_2x2": np.full((3, 2, 2), 200, np.uint8),
        "pixel_1x1": np.full((3, 1, 1), 255, np.uint8),
    }


EDGE = _edge_images()


@pytest.mark.parametrize("name", sorted(EDGE))
@pytest.mark.parametrize("t", [1, 2])
def test_hidden_bits_come_back_exactly(name, t):
    cover = EDGE[name]
    message = np.random.default_rng(2).integers(0, 2, 60, dtype=np.uint8)
    out = embed_bits(cover, message, t=t, max_layers=2)
    if out is None:
        # Only images too small, or too noisy for the neighbours to predict a pixel (a 0/255
        # checkerboard: every prediction error is +-255), may refuse 60 bits.
        assert name in {
            "noise",
            "saturated_noise",
            "near_ends",
            "checker_0_255",
            "row_1x9",
            "tiny_2x2",
            "pixel_1x1",
            "odd_7x5",
        }
        return
    marked, slots, start = out
    assert marked.dtype == np.uint8 and marked.shape == cover.shape
    assert np.abs(marked.astype(int) - cover).max() <= t * 2
    restored, bits = extract_bits(marked, t=t, start=start)
    assert np.array_equal(restored, cover)
    assert np.array_equal(bits[: len(message)], message)


@pytest.mark.parametrize("name", sorted(EDGE))
def test_protect_recover_is_bit_exact_on_edge_images(name):
    x = torch.from_numpy(EDGE[name])[None].repeat(2, 1, 1, 1)
    x[1] = 255 - x[1]  # and the negative, so every image's "other end" is covered too
    method = rdh(channels=x.shape[1], eps=6, steps=3)
    protected = method.protect(x, torch.tensor([0, 1]))
    assert protected.dtype == torch.uint8 and protected.shape == x.shape
    assert torch.equal(method.recover(protected), x)
    embedded = method.per_image["embedded"]
    for i in range(2):
        if embedded[i]:
            assert not torch.equal(protected[i], x[i])
        else:  # stored unchanged, and recognised as such
            assert torch.equal(protected[i], x[i])
    if name in {"uniform0", "uniform255", "uniform128", "half_black_half_white", "clipped_ramp"}:
        # Flat and saturated images hold plenty: they are protected, not skipped.
        assert bool(embedded.all())
        assert method.stats["kept_values"] > 0
    if name == "pixel_1x1":
        assert not bool(embedded.any()) and method.stats["unembedded"] == 2
    if name == "saturated_noise":
        # Too noisy for the method's threshold: only the empty perturbation, in wide bins.
        assert bool(method.per_image["fallback"].all()) and method.stats["kept_values"] == 0
    if name in {"noise", "checker_0_255"}:
        assert method.stats["unembedded"] == 2  # unpredictable: nothing fits at all


def test_images_stored_unchanged_and_fallback_images_behave():
    noisy = torch.from_numpy(EDGE["saturated_noise"])[None]
    checker = torch.from_numpy(EDGE["checker_0_255"])[None]
    method = rdh(steps=2)
    protected = method.protect(torch.cat([noisy, checker]), torch.tensor([0, 1]))
    assert method.per_image["fallback"].tolist() == [True, False]
    assert method.per_image["embedded"].tolist() == [True, False]
    assert torch.equal(protected[1], checker[0])  # could not carry anything: unchanged
    assert torch.equal(method.recover(protected), torch.cat([noisy, checker]))
    # Documented limit: an altered fallback image may itself look unable to carry data
    # (its wide bins are spent); it is then returned as it is, which differs from the
    # original. It is never turned into anything else.
    for where in [(0, 0, 0), (1, 5, 5), (2, 31, 30), (0, 16, 17)]:
        bad = _altered(protected[:1], where)
        try:
            out = method.recover(bad)
        except RDHError:
            continue
        assert torch.equal(out, bad) or torch.equal(out, noisy)


# ------------------------------------------------------------------------- real images
@pytest.mark.data
def test_round_trip_on_real_cifar10(protected_cifar):
    x, _, protected, method = protected_cifar
    assert len(x) == 200
    assert torch.equal(method.recover(protected), x)
    psnr = psnr_db(protected, x)
    print(f"\nRDH on 200 CIFAR-10 test images: {method.stats}")
    assert bool(torch.isfinite(psnr).all()) and float(psnr.max()) < PSNR_MAX_DB
    assert 30.0 < float(psnr.mean()) < 50.0
    assert method.stats["unembedded"] == 0
    # Reversibility costs strength: only a small part of the dense perturbation survives.
    stats = method.stats
    assert 0.0 < stats["kept_fraction"] < 0.5
    assert HEADER_BITS < stats["payload_bits"] <= 1.2 * stats["capacity_bits"]
    # Each value moves by the perturbation plus at most T levels per layer of hiding.
    layers = torch.ceil(method.per_image["slots"] / 6).long()
    t = torch.where(method.per_image["fallback"], FALLBACK_THRESHOLD, method.pee_threshold)
    limit = torch.where(method.per_image["fallback"], 0, int(method.eps)) + t * layers
    assert bool(((protected.short() - x.short()).abs().amax((1, 2, 3)) <= limit).all())
    assert int(method.per_image["kept_values"][method.per_image["fallback"]].sum()) == 0
    assert stats["fallback"] <= 2
    assert method.config()["stats"] == stats


@pytest.mark.data
def test_kept_counts_match_the_hidden_perturbation(protected_cifar):
    x, _, protected, method = protected_cifar
    normal = np.flatnonzero(~method.per_image["fallback"].numpy())
    for i in normal[[0, 57, 149, -1]]:
        p = protected[i].numpy()
        original, d = reveal_perturbation(p, method.pee_threshold, with_perturbation=True)
        assert np.array_equal(original, x[i].numpy())
        assert np.count_nonzero(d) == int(method.per_image["kept_values"][i])
        assert 0 < np.count_nonzero(d) <= int(method.per_image["dense_values"][i])
        assert np.abs(d).max() <= int(method.eps)


def _altered(images: torch.Tensor, where: tuple[int, int, int]) -> torch.Tensor:
    """A copy of (1, C, H, W) ``images`` with one value moved by one level."""
    bad = images.clone()
    v = int(bad[(0, *where)])
    bad[(0, *where)] = v + 1 if v < 255 else v - 1
    return bad


@pytest.mark.data
def test_tampering_is_detected_and_never_yields_a_wrong_image(protected_cifar):
    """Decision: recovery never returns a wrong image.

    A changed pixel raises RDHError (the CRC-32 of the original no longer matches, or the
    hidden structure breaks), except when it only flipped a padding bit past the hidden
    message: then nothing hidden changed and the exact original comes back.
    """
    x, _, protected, method = protected_cifar
    t = method.pee_threshold
    rng = np.random.default_rng(3)
    geom = _geometry(32, 32)
    checked = raised = total = 0
    for i in range(0, 200, 10):
        p = protected[i].numpy()
        try:
            _reveal_at(p, t, None, 0)
        except RDHError:
            continue  # read from another start slot; the head lies elsewhere
        # The first bit-carrying pixel of the slot read first (channel 0, colour 1): it
        # holds the head of the hidden stream (slot counts, location map).
        flat = np.pad(p[0].astype(np.int16), 1).ravel()
        pred = _predict(flat, geom, 1)
        e2 = _orientation(pred) * (flat[geom.idx[1]] - pred)
        first = int(geom.idx[1][np.flatnonzero((e2 >= -2 * t) & (e2 < 2 * t))[0]])
        r, c = divmod(first, 34)
        with pytest.raises(RDHError, match="image 0: cannot recover: the protected image"):
            method.recover(_altered(protected[i : i + 1], (0, r - 1, c - 1)))
        checked += 1
        for _ in range(5):  # anywhere in the image
            bad = _altered(
                protected[i : i + 1], tuple(int(v) for v in rng.integers(0, [3, 32, 32]))
            )
            total += 1
            try:
                assert torch.equal(method.recover(bad), x[i : i + 1])
            except RDHError:
                raised += 1
    assert checked >= 15
    assert raised >= 0.8 * total
    # A clean image that could carry data was never protected: recovering it is an error too.
    with pytest.raises(RDHError):
        method.recover(x[1:2])


@pytest.mark.data
def test_a_key_is_needed_to_recover_a_keyed_image(cifar):
    x, y = cifar.test_set.images[:8], cifar.test_set.labels[:8]
    keyed = rdh(key=1234, steps=2)
    protected = keyed.protect(x, y)
    assert torch.equal(keyed.recover(protected), x)
    assert torch.equal(rdh(key=1234).recover(protected), x)  # recovery needs only P and key
    with pytest.raises(RDHError, match="altered, or the key"):
        rdh(key=999).recover(protected)
    with pytest.raises(RDHError):
        rdh().recover(protected)
    assert keyed.config()["keyed"] is True and "1234" not in str(keyed.config())


@pytest.mark.data
def test_protection_lowers_a_trained_surrogates_accuracy(cifar):
    torch.manual_seed(0)
    model = create_classifier("resnet_tiny_cifar", 10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xs, ys = cifar.train_set.images.float() / 255, cifar.train_set.labels
    assert len(xs) == 1000
    model.train()
    for _ in range(2):
        perm = torch.randperm(len(xs))
        for b in perm.split(32):
            loss = F.cross_entropy(model(xs[b]), ys[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    x, y = cifar.test_set.images[::2], cifar.test_set.labels[::2]  # 10 per class
    method = create_method({"kind": "rdh"}, [model], batch_size=100)
    protected = method.protect(x, y)
    assert torch.equal(method.recover(protected), x)
    with torch.no_grad():
        acc_clean = (model(x.float() / 255).argmax(1) == y).float().mean().item()
        acc_prot = (model(protected.float() / 255).argmax(1) == y).float().mean().item()
    psnr = float(psnr_db(protected, x).mean())
    print(
        f"\nsurrogate accuracy clean {acc_clean:.3f} -> protected {acc_prot:.3f}, "
        f"PSNR {psnr:.2f} dB, kept fraction {method.stats['kept_fraction']:.3f}"
    )
    assert acc_clean > 0.2  # the surrogate learned something (chance: 0.1)
    assert acc_prot < acc_clean - 0.1


@pytest.mark.data
def test_targeted_mode_pushes_toward_the_permuted_class(cifar):
    from raeg_pl.losses import label_permutation

    x = cifar.test_set.images[:16]
    model = tiny_surrogate()
    with torch.no_grad():
        y = model(x.float() / 255).argmax(1)
    method = ReversibleDataHidingMethod([model], targeted=True, num_classes=10, steps=5)
    protected = method.protect(x, y)
    assert torch.equal(method.recover(protected), x)
    target = label_permutation(10, 0)[y]
    with torch.no_grad():
        z_clean = model(x.float() / 255).gather(1, target[:, None])
        z_prot = model(protected.float() / 255).gather(1, target[:, None])
    assert float((z_prot - z_clean).mean()) > 0
    assert method.config()["targeted"] is True and method.config()["num_classes"] == 10


def test_create_method_builds_it():
    method = create_method({"kind": "rdh", "eps": 4}, [tiny_surrogate()], batch_size=8, seed=3)
    assert isinstance(method, ReversibleDataHidingMethod)
    assert method.reversible and method.eps == 4.0 and method.seed == 3
    cfg = method.config()
    assert cfg["name"] == "rdh" and cfg["eps"] == 4.0 and "stats" not in cfg
    with pytest.raises(ValueError, match="pee_threshold"):
        create_method({"kind": "rdh", "pee_threshold": 0}, [tiny_surrogate()])
    with pytest.raises(ValueError, match="surrogate"):
        create_method({"kind": "rdh"}, []).protect(
            torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, dtype=torch.long)
        )


def test_reveal_rejects_an_image_that_holds_nothing():
    cover = EDGE["uniform128"]
    with pytest.raises(RDHError):
        reveal_perturbation(cover, 2)


# ------------------------------------------------------------------------------ RAEG's targets
def test_targeted_mode_targets_raeg_classes_whatever_the_method_seed():
    import inspect

    from raeg_pl.lit.protector import ProtectorLitModule
    from raeg_pl.losses import label_permutation

    raeg_default = inspect.signature(ProtectorLitModule).parameters["target_seed"].default
    labels = torch.arange(10).repeat(3)
    probe = torch.zeros(1, 3, 8, 8)
    for seed in (0, 5):
        method = ReversibleDataHidingMethod([tiny_surrogate()], targeted=True, seed=seed)
        assert method.target_seed == raeg_default  # RAEG's own default
        targets = method._attack_labels(labels, method.surrogates, probe)
        # The protector's permutation buffer is label_permutation(K, target_seed).
        assert torch.equal(targets, label_permutation(10, raeg_default)[labels])
        assert not bool((targets == labels).any())  # a derangement
    other = ReversibleDataHidingMethod([tiny_surrogate()], targeted=True, target_seed=3)
    targets = other._attack_labels(labels, other.surrogates, probe)
    assert torch.equal(targets, label_permutation(10, 3)[labels])
    assert other.config()["target_seed"] == 3


@pytest.mark.data
def test_psnr_budget_lands_on_target_and_stays_bit_exactly_reversible(cifar):
    x, y = cifar.test_set.images[:60], cifar.test_set.labels[:60]
    method = rdh(psnr=33.0, steps=4, targeted=True, batch_size=60)
    assert method.eps is None and method.config()["psnr"] == 33.0
    protected = method.protect(x, y)
    assert torch.equal(method.recover(protected), x)
    psnr = float(psnr_db(protected, x).mean())
    assert abs(psnr - 33.0) <= 0.3, psnr
    # Without an L-inf bound the perturbation concentrates: far beyond the old 6 levels.
    assert int((protected.short() - x.short()).abs().max()) > 12
