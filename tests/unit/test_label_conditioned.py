"""Tests of the label-conditioned protector option end to end: training, checkpoints, the
RAEG method's protect/recover with labels, and key files that carry it with its class names."""

from __future__ import annotations

import pytest
import torch

from raeg_pl.io.keyfile import (
    KeyFileError,
    export_key,
    load_key,
    load_protector_checkpoint,
    read_key,
    save_key,
)
from raeg_pl.methods.raeg import RAEGMethod
from raeg_pl.models.encdec import create_protector, protector_from_config
from raeg_pl.models.protector import InvertibleProtector


def _perturb(model: torch.nn.Module, scale: float = 0.01, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)


def _checkpoint(net: InvertibleProtector, path) -> None:
    """The layout of a ProtectorLitModule checkpoint, for the protector part."""
    torch.save(
        {
            "protector_config": net.config,
            "protector_fingerprint": net.fingerprint(),
            "state_dict": {f"protector.{k}": v for k, v in net.state_dict().items()},
        },
        path,
    )


def test_encoder_decoder_is_label_conditioned_like_the_invertible_generator() -> None:
    # The ablation row that swaps the generator keeps the rest of the recipe, conditioning
    # included.
    net = create_protector("encdec", levels=1, blocks_per_level=1, hidden_channels=8, num_classes=3)
    assert net.conditional and net.config["num_classes"] == 3
    assert protector_from_config(net.config).conditional
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(4, 3, 10, 12)
    y0 = net(x, torch.zeros(4, dtype=torch.long))
    y1 = net(x, torch.ones(4, dtype=torch.long))
    assert y0.shape == x.shape and not torch.allclose(y0, y1)
    assert not torch.allclose(net.inverse(y0, torch.zeros(4)), net.inverse(y0, torch.ones(4)))
    with pytest.raises(ValueError, match="conditioned on the class label"):
        net(x)
    with pytest.raises(ValueError, match="labels must lie"):
        net(x, torch.full((4,), 3))


def test_raeg_method_protects_and_recovers_with_labels(tmp_path) -> None:
    net = InvertibleProtector(levels=2, blocks_per_level=1, hidden_channels=8, num_classes=4)
    _perturb(net, 0.001)  # changes of a few levels, like a trained protector's
    _checkpoint(net, tmp_path / "cond.ckpt")
    loaded = load_protector_checkpoint(tmp_path / "cond.ckpt")
    assert loaded.conditional and loaded.fingerprint() == net.fingerprint()

    method = RAEGMethod(tmp_path / "cond.ckpt", batch_size=5)
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(12) % 4
    protected = method.protect(images, labels)
    assert protected.dtype == torch.uint8 and (protected != images).any()
    # Each image's change depends on its class.
    assert (method.protect(images, (labels + 1) % 4) != protected).any()

    def error(x: torch.Tensor) -> float:
        return float((x.int() - images.int()).abs().float().mean())

    # Recovery from 8-bit storage with the right labels is close to the original (the
    # rounding error only); with wrong labels it is as far off as the protected images.
    assert error(protected) > 2.0
    assert error(method.recover(protected, labels)) < 0.2
    assert error(method.recover(protected, (labels + 1) % 4)) > 2.0
    with pytest.raises(ValueError, match=r"cond\.ckpt is conditioned on class labels"):
        method.recover(protected)


def test_key_files_hold_label_conditioned_protectors_with_their_classes(tmp_path) -> None:
    net = InvertibleProtector(levels=1, blocks_per_level=1, hidden_channels=4, num_classes=3)
    _perturb(net, 0.01)
    _checkpoint(net, tmp_path / "cond.ckpt")
    # Without class names a conditioned key could not label folders: refused, nothing written.
    with pytest.raises(KeyFileError, match=r"cond\.ckpt: the protector is conditioned on 3"):
        export_key(tmp_path / "cond.ckpt", tmp_path / "cond.raegkey")
    assert not (tmp_path / "cond.raegkey").exists()
    with pytest.raises(KeyFileError, match=r"has 3 classes but 2 class names"):
        export_key(tmp_path / "cond.ckpt", tmp_path / "cond.raegkey", classes=["a", "b"])
    with pytest.raises(KeyFileError, match=r"distinct"):
        export_key(tmp_path / "cond.ckpt", tmp_path / "cond.raegkey", classes=["a", "a", "b"])

    names = ["cat", "dog", "frog"]
    fingerprint = export_key(tmp_path / "cond.ckpt", tmp_path / "cond.raegkey", classes=names)
    key = read_key(tmp_path / "cond.raegkey")
    assert key.conditional and key.classes == tuple(names) and key.fingerprint == fingerprint
    assert load_key(tmp_path / "cond.raegkey").fingerprint() == net.fingerprint()
    # Re-exporting a key keeps its classes; a checkpoint that carries them needs none.
    export_key(tmp_path / "cond.raegkey", tmp_path / "again.raegkey")
    assert read_key(tmp_path / "again.raegkey").classes == tuple(names)
    blob = torch.load(tmp_path / "cond.ckpt", weights_only=False)
    blob["classes"] = ["x", "y", "z"]
    torch.save(blob, tmp_path / "named.ckpt")
    export_key(tmp_path / "named.ckpt", tmp_path / "named.raegkey")
    assert read_key(tmp_path / "named.raegkey").classes == ("x", "y", "z")

    # A hand-made key without class names, or with an edited version, is refused on load.
    from raeg_pl.io.keyfile import key_blob

    torch.save(key_blob(net), tmp_path / "hand.raegkey")
    with pytest.raises(KeyFileError, match=r"hand\.raegkey: this protector is conditioned"):
        load_key(tmp_path / "hand.raegkey")
    torch.save(key_blob(net, names) | {"version": 1}, tmp_path / "v1.raegkey")
    with pytest.raises(KeyFileError, match=r"v1\.raegkey: key file version 1 does not match"):
        load_key(tmp_path / "v1.raegkey")
    # Unconditioned keys stay version 1 and ignore classes.
    plain = InvertibleProtector(levels=1, blocks_per_level=1, hidden_channels=4)
    save_key(plain, tmp_path / "plain.raegkey", classes=["ignored"])
    assert torch.load(tmp_path / "plain.raegkey", weights_only=True)["version"] == 1
    assert read_key(tmp_path / "plain.raegkey").classes == ()


@pytest.mark.data
def test_lit_module_trains_a_label_conditioned_protector(fit_tiny_protector, tmp_path) -> None:
    initial = {}
    model, trainer, dm = fit_tiny_protector(
        validate=True,
        before_fit=lambda m: initial.update(embed=m.protector.embed.weight.detach().clone()),
        levels=2,
        blocks_per_level=1,
        hidden_channels=8,
        label_conditioned=True,
    )
    assert model.protector.conditional and model.protector.num_classes == 10
    assert not torch.equal(model.protector.embed.weight.detach(), initial["embed"])  # it learns
    assert trainer.global_step == 3 and model.recoveries == 0
    assert "val/psnr_recovered" in trainer.callback_metrics

    ckpt = tmp_path / "protector.ckpt"
    trainer.save_checkpoint(ckpt)
    net = load_protector_checkpoint(ckpt)
    assert net.conditional and net.fingerprint() == model.protector.fingerprint()
    x = dm.train_set.images[:6].float() / 255
    y = dm.train_set.labels[:6]
    with torch.no_grad():
        torch.testing.assert_close(net.inverse(net(x, y), y), x, rtol=0, atol=1e-5)
