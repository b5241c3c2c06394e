"""Tests of the invertible protector: exact bijection, identity at init, Haar, fingerprint."""

from __future__ import annotations

import pytest
import torch

from raeg_pl.models.protector import (
    AffineCoupling,
    InvertibleProtector,
    haar_downsample,
    haar_upsample,
)

# Multiples of 2**levels, odd sizes, and an even size that is not a multiple of 4 or 8.
SIZES = [(32, 32), (33, 47), (64, 48), (17, 17), (34, 30)]


def _perturb(model: torch.nn.Module, scale: float = 0.01, seed: int = 0) -> None:
    """Add Gaussian noise to every parameter, so the network is far from the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_haar_round_trip_and_energy() -> None:
    x = torch.randn(2, 3, 8, 10, dtype=torch.float64)
    y = haar_downsample(x)
    assert y.shape == (2, 12, 4, 5)
    torch.testing.assert_close(haar_upsample(y), x, rtol=0, atol=1e-12)
    # Orthonormal: per-image energy is preserved, and the LL band is 2x the block mean.
    torch.testing.assert_close(y.square().sum(), x.square().sum())
    block_mean = torch.nn.functional.avg_pool2d(x, 2)
    torch.testing.assert_close(y[:, :3], 2 * block_mean)


def test_haar_is_orthogonal_matrix() -> None:
    # The transform of the standard basis must be an orthogonal matrix.
    n = 1 * 4 * 4
    basis = torch.eye(n, dtype=torch.float64).reshape(n, 1, 4, 4)
    m = haar_downsample(basis).reshape(n, n)
    torch.testing.assert_close(m @ m.T, torch.eye(n, dtype=torch.float64))


def test_haar_rejects_odd_sizes() -> None:
    with pytest.raises(ValueError):
        haar_downsample(torch.zeros(1, 3, 5, 4))


def test_coupling_identity_at_init_and_round_trip() -> None:
    block = AffineCoupling(12, hidden_channels=8, clamp=1.0)
    x = torch.randn(2, 12, 6, 6)
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)
    _perturb(block, 0.1)
    y = block(x)
    assert (y - x).abs().max() > 1e-2
    torch.testing.assert_close(block.inverse(y), x, rtol=0, atol=1e-5)


def test_coupling_updates_both_halves_and_respects_mask() -> None:
    block = AffineCoupling(12, hidden_channels=8)
    _perturb(block, 0.1)
    x = torch.randn(1, 12, 6, 6)
    mask = torch.ones(1, 1, 6, 6)
    mask[..., 4:, :] = 0
    y = block(x, mask)
    assert (y[:, :6] - x[:, :6]).abs().max() > 1e-3
    assert (y[:, 6:] - x[:, 6:]).abs().max() > 1e-3
    torch.testing.assert_close(y[..., 4:, :], x[..., 4:, :], rtol=0, atol=0)
    torch.testing.assert_close(block.inverse(y, mask), x, rtol=0, atol=1e-5)


def test_coupling_log_scale_is_soft_clamped() -> None:
    block = AffineCoupling(4, hidden_channels=4, clamp=0.5)
    with torch.no_grad():
        block.subnet2.conv3.bias.fill_(100.0)  # saturates the sigmoid: s -> +clamp
    x = torch.ones(1, 4, 3, 3)
    y = block(x)
    # Second half: x2 * exp(s) + t with s -> 0.5 and t = 100 (the shift shares the bias).
    torch.testing.assert_close(y[:, 2:], torch.full_like(y[:, 2:], 100 + torch.e**0.5))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_protector_identity_at_init(size: tuple[int, int]) -> None:
    g = InvertibleProtector(levels=2, blocks_per_level=2, hidden_channels=8)
    x = torch.rand(2, 3, *size)
    torch.testing.assert_close(g(x), x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_protector_round_trip_exact(levels: int, size: tuple[int, int]) -> None:
    g = InvertibleProtector(levels=levels, blocks_per_level=2, hidden_channels=8)
    _perturb(g, 0.01, seed=levels)
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        y = g(x)
        x_rec = g.inverse(y)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert (y - x).abs().max() > 0.05, "perturbed network should not be the identity"
    torch.testing.assert_close(x_rec, x, rtol=0, atol=1e-5)
    # The bijection also holds the other way round.
    torch.testing.assert_close(g(g.inverse(x)), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [(33, 47), (17, 17)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_odd_sizes_leave_only_the_straddling_border_untouched(size: tuple[int, int]) -> None:
    g = InvertibleProtector(levels=2, blocks_per_level=2, hidden_channels=8)
    _perturb(g, 0.01)
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        y = g(x)
    h, w = size
    # The last row/column of an odd side shares its 2x2 Haar block with padding: unchanged.
    torch.testing.assert_close(y[..., h - 1, :], x[..., h - 1, :], rtol=0, atol=1e-6)
    torch.testing.assert_close(y[..., :, w - 1], x[..., :, w - 1], rtol=0, atol=1e-6)
    # Every other pixel of the interior is transformed.
    inner = (y[..., : h - 1, : w - 1] - x[..., : h - 1, : w - 1]).abs().amax(dim=1)
    assert (inner > 1e-5).float().mean() > 0.99


def test_protector_float64_and_bfloat16_inputs_run_in_float32() -> None:
    g = InvertibleProtector(levels=1, blocks_per_level=1, hidden_channels=4)
    for dtype in (torch.float64, torch.bfloat16):
        x = torch.rand(1, 3, 8, 8).to(dtype)
        assert g(x).dtype == torch.float32
        assert g.inverse(x).dtype == torch.float32
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert g(torch.rand(1, 3, 8, 8)).dtype == torch.float32


def test_fingerprint_tracks_weights_and_config() -> None:
    g1 = InvertibleProtector(levels=1, blocks_per_level=1, hidden_channels=4)
    fp = g1.fingerprint()
    assert len(fp) == 64 and fp == g1.fingerprint()
    g2 = InvertibleProtector(**g1.config)
    g2.load_state_dict(g1.state_dict())
    assert g2.fingerprint() == fp
    with torch.no_grad():
        next(iter(g2.parameters())).view(-1)[0] += 1e-3
    assert g2.fingerprint() != fp
    g3 = InvertibleProtector(levels=1, blocks_per_level=1, hidden_channels=4, clamp=2.0)
    g3.load_state_dict(g1.state_dict())
    assert g3.fingerprint() != fp


def test_config_round_trip() -> None:
    cfg = {"in_channels": 3, "levels": 3, "blocks_per_level": 2, "hidden_channels": 8, "clamp": 0.5}
    g = InvertibleProtector(**cfg)
    assert g.config == cfg
    g.config["levels"] = 99  # a copy: the module's config cannot be mutated from outside
    assert g.config == cfg


def test_gradients_reach_every_parameter() -> None:
    g = InvertibleProtector(levels=2, blocks_per_level=1, hidden_channels=4)
    _perturb(g, 0.01)  # with zero last layers only those would receive gradient
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    y = g(x)
    (y.square().mean() + g.inverse(y).sin().mean()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in g.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gradient_at_init_reaches_zero_initialised_layers() -> None:
    g = InvertibleProtector(levels=2, blocks_per_level=1, hidden_channels=4)
    x = torch.rand(2, 3, 16, 16)
    (g(x) - x.flip(-1)).square().mean().backward()
    grads = [m.subnet2.conv3.weight.grad for m in g.modules() if isinstance(m, AffineCoupling)]
    assert all(gr is not None and gr.abs().sum() > 0 for gr in grads)


# ------------------------------------------------------------------ label conditioning
@pytest.mark.parametrize("size", [(32, 32), (33, 47), (17, 17)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_label_conditioned_protector_is_a_bijection_per_label(size: tuple[int, int]) -> None:
    g = InvertibleProtector(levels=2, blocks_per_level=2, hidden_channels=8, num_classes=10)
    x = torch.rand(4, 3, *size)
    labels = torch.tensor([0, 3, 3, 9])
    torch.testing.assert_close(g(x, labels), x, rtol=0, atol=1e-6)  # identity at init
    _perturb(g, 0.01, seed=3)
    with torch.no_grad():
        y = g(x, labels)
        torch.testing.assert_close(g.inverse(y, labels), x, rtol=0, atol=1e-5)
        torch.testing.assert_close(g(g.inverse(x, labels), labels), x, rtol=0, atol=1e-5)
        # The label changes the map: the same image protected under another class differs,
        # and inverting with the wrong label does not give the original back.
        other = torch.tensor([1, 4, 4, 0])
        assert (g(x, other) - y).abs().amax(dim=(1, 2, 3)).min() > 1e-3
        assert (g.inverse(y, other) - x).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_label_conditioned_protector_checks_its_labels() -> None:
    g = InvertibleProtector(levels=1, blocks_per_level=1, hidden_channels=4, num_classes=3)
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="conditioned on the class label"):
        g(x)
    with pytest.raises(ValueError, match="conditioned on the class label"):
        g.inverse(x)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        g(x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="got 1 labels for 2 images"):
        g(x, torch.tensor([1]))
    # An unconditioned protector takes labels and ignores them.
    plain = InvertibleProtector(levels=1, blocks_per_level=1, hidden_channels=4)
    _perturb(plain, 0.01)
    with torch.no_grad():
        torch.testing.assert_close(plain(x, torch.tensor([0, 1])), plain(x), rtol=0, atol=0)


def test_label_condition_is_part_of_config_and_fingerprint_only_when_used() -> None:
    plain = InvertibleProtector(levels=1, blocks_per_level=1, hidden_channels=4)
    assert "num_classes" not in plain.config  # unconditioned configs and digests unchanged
    g = InvertibleProtector(levels=1, blocks_per_level=1, hidden_channels=4, num_classes=5)
    assert g.config["num_classes"] == 5 and g.config["cond_channels"] == 8 and g.conditional
    rebuilt = InvertibleProtector(**g.config)
    rebuilt.load_state_dict(g.state_dict())
    assert rebuilt.fingerprint() == g.fingerprint() != plain.fingerprint()
    with torch.no_grad():
        rebuilt.embed.weight[0, 0] += 1e-3
    assert rebuilt.fingerprint() != g.fingerprint()


def test_gradients_reach_the_label_embedding() -> None:
    g = InvertibleProtector(levels=2, blocks_per_level=1, hidden_channels=4, num_classes=4)
    _perturb(g, 0.01)
    x, labels = torch.rand(3, 3, 16, 16), torch.tensor([0, 1, 1])
    g(x, labels).square().mean().backward()
    grad = g.embed.weight.grad
    assert grad[:2].abs().sum(dim=1).min() > 0  # used labels get gradient
    assert grad[2:].abs().sum() == 0  # unused ones do not


@pytest.mark.parametrize(("size", "num_classes"), [((8, 8), 0), ((5, 7), 0), ((8, 4), 3)])
def test_log_det_is_the_jacobians(size: tuple[int, int], num_classes: int) -> None:
    """``forward_log_det`` gives ``log|det dG/dx|`` of the whole map, padding and labels
    included: the autograd Jacobian's log-determinant, on a network far from the identity."""
    model = InvertibleProtector(
        levels=2, blocks_per_level=1, hidden_channels=8, num_classes=num_classes
    )
    _perturb(model, scale=0.05)  # larger: float32 Jacobians too ill-conditioned to check
    x = torch.rand(1, 3, *size)
    labels = torch.tensor([2]) if num_classes else None
    y, log_det = model.forward_log_det(x, labels)
    torch.testing.assert_close(y, model(x, labels))
    jac = torch.autograd.functional.jacobian(
        lambda v: model(v.reshape(x.shape), labels).reshape(-1), x.reshape(-1)
    )
    sign, expected = torch.linalg.slogdet(jac.double())
    assert sign != 0
    assert abs(float(log_det[0]) - float(expected)) < 1e-3 * max(1.0, abs(float(expected)))
    assert abs(float(expected)) > 0.1  # the perturbed network is not volume-preserving
    # An untrained protector is the identity: log-determinant 0.
    fresh = InvertibleProtector(levels=2, blocks_per_level=1, hidden_channels=8)
    assert float(fresh.forward_log_det(x)[1].abs().max()) == 0.0
