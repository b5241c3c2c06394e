"""Tests of the encoder-decoder protector, the non-invertible baseline of the generator ablation.

Identity at init on any size, gradients through both U-Nets, learned (not exact) recovery on
real CIFAR-10, the ``generator`` switch of ProtectorLitModule and checkpoint reloading.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raeg_pl.data import ImageClassificationDataModule
from raeg_pl.io.keyfile import KeyFileError, export_key, load_protector_checkpoint
from raeg_pl.lit.protector import ProtectorLitModule
from raeg_pl.losses import psnr, quantize_ste, recovery_loss
from raeg_pl.models.encdec import (
    EncoderDecoderProtector,
    create_protector,
    protector_from_config,
)
from raeg_pl.models.protector import InvertibleProtector

# Multiples of 2**levels, odd sizes, a single pixel, and sides smaller than the padding.
SIZES = [(32, 32), (33, 47), (17, 17), (1, 1), (5, 40)]


def _perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Add Gaussian noise to every parameter, so the network is far from the identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # The networks here are tiny: a second intra-op thread gains nothing, and on a busy
    # shared CPU threads waiting for each other made the 200-step fit below take minutes
    # instead of seconds.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("size", SIZES)
def test_identity_at_init_on_any_size(levels: int, size: tuple[int, int]) -> None:
    g = EncoderDecoderProtector(levels=levels, blocks_per_level=1, hidden_channels=8)
    x = torch.rand(2, 3, *size)
    for out in (g(x), g.inverse(x)):
        assert out.shape == x.shape and out.dtype == torch.float32
        torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


def test_odd_sizes_pad_by_replication_and_crop() -> None:
    g = EncoderDecoderProtector(levels=2, blocks_per_level=1, hidden_channels=8)
    _perturb(g)
    x = torch.rand(2, 3, 33, 47)
    y = g(x)
    assert (y - x).abs().max() > 1e-2  # perturbed: far from the identity
    # An odd-sized image is processed as its replicate-padded version, then cropped.
    padded = F.pad(x, (0, 1, 0, 3), mode="replicate")
    torch.testing.assert_close(y, g(padded)[..., :33, :47], rtol=0, atol=1e-6)
    padded_y = F.pad(y, (0, 1, 0, 3), mode="replicate")
    torch.testing.assert_close(g.inverse(y), g.inverse(padded_y)[..., :33, :47], rtol=0, atol=1e-6)
    # No normalisation layers: an image's output does not depend on its batch mates.
    torch.testing.assert_close(g(x[:1]), y[:1], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="expected a"):
        g(torch.rand(2, 1, 8, 8))


def test_gradients_reach_encoder_and_decoder_from_recovery_loss() -> None:
    g = EncoderDecoderProtector(levels=2, blocks_per_level=1, hidden_channels=8)
    # Off-grid values, so 8-bit storage loses information and the recovery loss is non-zero.
    x = torch.rand(4, 3, 16, 16)
    loss = recovery_loss(g.inverse(quantize_ste(g(x))), x)
    loss.backward()
    # At init only the zero-initialised output convolutions can receive gradient, and the
    # encoder's arrives through the straight-through 8-bit rounding.
    assert g.encoder.head.weight.grad.abs().sum() > 0
    assert g.decoder.head.weight.grad.abs().sum() > 0
    # One step later, every parameter of both U-Nets is reached.
    with torch.no_grad():
        for p in g.parameters():
            p -= 0.1 * p.grad
    g.zero_grad()
    recovery_loss(g.inverse(quantize_ste(g(x))), x).backward()
    for name, p in g.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_config_fingerprint_and_rebuild() -> None:
    g = EncoderDecoderProtector(levels=2, blocks_per_level=1, hidden_channels=8)
    _perturb(g)
    assert g.config == {
        "generator": "encdec",
        "in_channels": 3,
        "levels": 2,
        "blocks_per_level": 1,
        "hidden_channels": 8,
    }
    rebuilt = protector_from_config(g.config)
    assert isinstance(rebuilt, EncoderDecoderProtector)
    assert rebuilt.fingerprint() != g.fingerprint()
    rebuilt.load_state_dict(g.state_dict())
    assert rebuilt.fingerprint() == g.fingerprint()
    with torch.no_grad():
        rebuilt.decoder.head.bias[0] += 1e-6
    assert rebuilt.fingerprint() != g.fingerprint()
    # A config without "generator" is an InvertibleProtector's (checkpoints written before
    # the encoder-decoder existed).
    inv = InvertibleProtector(levels=1, blocks_per_level=1, hidden_channels=4)
    assert "generator" not in inv.config
    assert isinstance(protector_from_config(inv.config), InvertibleProtector)
    assert isinstance(create_protector("encdec", levels=1), EncoderDecoderProtector)
    assert isinstance(create_protector("invertible", levels=1), InvertibleProtector)
    with pytest.raises(ValueError, match="generator"):
        create_protector("unet")
    with pytest.raises(ValueError, match="generator"):
        protector_from_config({**g.config, "generator": "unet"})


@pytest.mark.parametrize(("levels", "blocks", "hidden"), [(2, 2, 32), (2, 4, 64), (3, 4, 32)])
def test_parameter_count_comparable_to_invertible(levels: int, blocks: int, hidden: int) -> None:
    def count(net: torch.nn.Module) -> int:
        return sum(p.numel() for p in net.parameters())

    inv = count(InvertibleProtector(3, levels, blocks, hidden))
    encdec = count(EncoderDecoderProtector(3, levels, blocks, hidden))
    assert 0.75 < encdec / inv < 1.3, (inv, encdec)


@pytest.mark.data
def test_decoder_learns_to_recover_on_real_cifar10(data_root, cache_dir) -> None:
    """A fixed pattern is added by the encoder; the decoder learns to take it away.

    Recovery is learned: it beats the identity decoder by a wide margin on held-out images,
    yet is not exact even from the float output (an invertible protector is exact to ~1e-6).
    """
    dm = ImageClassificationDataModule(
        data_dir=str(data_root),
        cache_dir=str(cache_dir),
        download=False,
        train_per_class=26,
        val_per_class=1,
        test_per_class=26,
    )
    dm.prepare_data()
    dm.setup()
    train = dm.train_set.images[:256].float() / 255
    test = dm.test_set.images[:256].float() / 255
    # A +-4/255 checkerboard with per-channel signs: 36 dB if the decoder did nothing.
    idx = torch.arange(32)
    checker = ((idx[:, None] + idx[None, :]) % 2 * 2 - 1).float()
    pattern = (4 / 255) * torch.tensor([1.0, -1.0, 1.0])[:, None, None] * checker

    g = EncoderDecoderProtector(levels=1, blocks_per_level=1, hidden_channels=4)
    opt = torch.optim.Adam(g.parameters(), lr=2e-3)
    batches = torch.Generator().manual_seed(0)
    for _ in range(200):
        x = train[torch.randint(0, len(train), (16,), generator=batches)]
        protected = g(x)
        recovered = g.inverse(quantize_ste(protected))
        loss = F.mse_loss(protected, x + pattern) + recovery_loss(recovered, x)
        opt.zero_grad()
        loss.backward()
        opt.step()

    with torch.no_grad():
        protected = g(test)
        stored = quantize_ste(protected)
        recovered = g.inverse(stored)
        from_float = g.inverse(protected)
    # The encoder learned the push ...
    assert F.mse_loss(protected, test + pattern) < 0.1 * pattern.square().mean()
    psnr_stored = float(psnr(stored, test))
    assert psnr_stored < 38.0, psnr_stored
    # ... and the decoder learned to undo it, far better than the identity would ...
    psnr_recovered = float(psnr(recovered, test))
    assert psnr_recovered > psnr_stored + 10.0, (psnr_stored, psnr_recovered)
    # ... but only approximately, even without the 8-bit rounding.
    assert (from_float - test).abs().max() > 1e-3


def test_bad_generator_name_is_refused() -> None:
    with pytest.raises(ValueError, match="generator must be one of"):
        ProtectorLitModule(["unused.ckpt"], generator="unet")


@pytest.mark.data
def test_lit_module_trains_encdec_and_checkpoint_reloads(fit_tiny_protector, tmp_path) -> None:
    model, trainer, dm = fit_tiny_protector(
        precision="bf16-mixed", generator="encdec", levels=1, blocks_per_level=1, hidden_channels=8
    )
    assert isinstance(model.protector, EncoderDecoderProtector)
    assert trainer.global_step == 3 and model.recoveries == 0
    # Both U-Nets moved away from the identity (their output convolutions start at zero).
    assert model.protector.encoder.head.weight.abs().sum() > 0
    assert model.protector.decoder.head.weight.abs().sum() > 0

    ckpt = tmp_path / "protector.ckpt"
    trainer.save_checkpoint(ckpt)
    net = load_protector_checkpoint(ckpt)
    assert isinstance(net, EncoderDecoderProtector) and not net.training
    assert net.config == model.protector.config
    assert net.fingerprint() == model.protector.fingerprint()
    images = dm.train_set.images[:8].float() / 255
    original = model.protector.cpu().eval()
    with torch.no_grad():
        torch.testing.assert_close(net(images), original(images), rtol=0, atol=1e-6)
        stored = quantize_ste(net(images))
        torch.testing.assert_close(net.inverse(stored), original.inverse(stored), rtol=0, atol=1e-6)
    # Key files hold invertible protectors only: exporting this checkpoint is refused clearly.
    with pytest.raises(KeyFileError, match="'encdec' generator"):
        export_key(ckpt, tmp_path / "encdec.raegkey")


def test_checkpoint_without_generator_entry_loads_as_invertible(tmp_path) -> None:
    net = InvertibleProtector(3, 1, 1, 4)
    _perturb(net, 0.01)
    # The layout of a ProtectorLitModule checkpoint written before the "generator" switch.
    ckpt = {
        "protector_config": net.config,
        "protector_fingerprint": net.fingerprint(),
        "state_dict": {f"protector.{k}": v for k, v in net.state_dict().items()},
    }
    torch.save(ckpt, tmp_path / "old.ckpt")
    loaded = load_protector_checkpoint(tmp_path / "old.ckpt")
    assert isinstance(loaded, InvertibleProtector)
    assert loaded.fingerprint() == net.fingerprint()
    # An unknown generator name is a damaged checkpoint, refused with the file's name.
    ckpt["protector_config"] = {**net.config, "generator": "unet"}
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(KeyFileError, match=r"bad\.ckpt.*unet"):
        load_protector_checkpoint(tmp_path / "bad.ckpt")
