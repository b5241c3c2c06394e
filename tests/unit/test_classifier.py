"""The timm classifier factory: normalisation inside, small-image variants, local weights."""

from __future__ import annotations

import pytest
import timm
import torch

from raeg_pl.models.classifier import CIFAR_MEAN, CIFAR_STD, Classifier, create_classifier


@pytest.mark.parametrize(
    "arch",
    [
        "resnet_tiny_cifar",
        "resnet_small_cifar",
        "resnet18_cifar",
        "vgg_tiny_cifar",
        "mobilenet_tiny_cifar",
        "vit_micro_cifar",
        "resnet_fast_tiny_cifar",
    ],
)
def test_small_image_variants_are_in_timms_registry(arch):
    assert arch in timm.list_models("*cifar*")
    model = create_classifier(arch, num_classes=10).eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert model.normalize.mean.flatten().tolist() == pytest.approx(CIFAR_MEAN)


def test_normalisation_lives_inside_the_model():
    model = create_classifier("resnet_tiny_cifar", num_classes=10).eval()
    x = torch.rand(4, 3, 32, 32)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    assert torch.allclose(model(x), model.backbone((x - mean) / std), atol=1e-5)


def test_timm_defaults_are_used_for_imagenet_models_and_grayscale_is_supported():
    model = create_classifier("resnet10t", num_classes=5, in_chans=1)
    assert isinstance(model, Classifier)
    cfg = timm.data.resolve_model_data_config(model.backbone)
    assert model.normalize.mean.flatten().tolist() == pytest.approx([sum(cfg["mean"]) / 3])
    assert model.eval()(torch.rand(1, 1, 32, 32)).shape == (1, 5)


@pytest.mark.parametrize("form", ["classifier", "backbone", "lightning"])
def test_local_checkpoint_round_trip(tmp_path, form):
    src = create_classifier("resnet_tiny_cifar", num_classes=10).eval()
    state = {
        "classifier": src.state_dict(),
        "backbone": src.backbone.state_dict(),
        "lightning": {"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}},
    }
    torch.save(state[form], tmp_path / "w.pt")
    dst = create_classifier("resnet_tiny_cifar", 10, checkpoint_path=tmp_path / "w.pt").eval()
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(src(x), dst(x))


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        create_classifier("resnet_tiny_cifar", 10, checkpoint_path=tmp_path / "nope.pt")


@pytest.mark.parametrize(
    "arch", ["vgg_tiny_cifar", "mobilenet_tiny_cifar", "vit_micro_cifar", "resnet_fast_tiny_cifar"]
)
def test_pirate_checkpoints_round_trip_in_every_form(tmp_path, arch):
    src = create_classifier(arch, num_classes=10).eval()
    x = torch.rand(2, 3, 32, 32)
    for name, state in (
        ("backbone", src.backbone.state_dict()),
        ("lightning", {"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}}),
    ):
        torch.save(state, tmp_path / f"{name}.pt")
        dst = create_classifier(arch, 10, checkpoint_path=tmp_path / f"{name}.pt").eval()
        assert torch.equal(src(x), dst(x)), name
