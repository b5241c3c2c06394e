"""Pirate architectures and the pirate-side training options of ClassifierLitModule.

Covers the 32x32 VGG, MobileNet, ViT and fast-ResNet variants in timm's registry, PGD
adversarial training (the pirate's adversarial-training defence) on real CIFAR-10,
compilation that leaves checkpoints unchanged, and flip test-time augmentation.
"""

from __future__ import annotations

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from torch._dynamo import list_backends, register_backend

from raeg_pl.data.datamodule import ImageClassificationDataModule
from raeg_pl.lit.classifier import ClassifierLitModule
from raeg_pl.models.classifier import CIFAR_MEAN, create_classifier, load_classifier_weights

PAIRS = {  # paper size (GPU) -> CPU size
    "vgg11_cifar": "vgg_tiny_cifar",
    "mobilenetv2_cifar": "mobilenet_tiny_cifar",
    "vit_tiny_cifar": "vit_micro_cifar",
    "resnet_fast_cifar": "resnet_fast_tiny_cifar",
}
# The airbench networks (standard profile): the CPU size has a quarter of the FLOPs, not
# a quarter of the weights, so they are not among PAIRS.
AIR = ("resnet_air_cifar", "resnet_air_small_cifar")
PIRATES = [*PAIRS, *PAIRS.values(), *AIR]


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------ architectures
@pytest.mark.parametrize("arch", PIRATES)
def test_pirate_builds_from_registry_and_trains(arch):
    assert arch in timm.list_models("*cifar*")
    torch.manual_seed(0)
    model = create_classifier(arch, num_classes=10).to(memory_format=torch.channels_last)
    assert model.normalize.mean.flatten().tolist() == pytest.approx(CIFAR_MEAN)
    x = torch.rand(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    logits = model.train()(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    F.cross_entropy(logits, torch.tensor([3, 7])).backward()
    params = dict(model.backbone.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and p.grad is None]
    assert not missing, missing
    # Gradients reach the input and the first layer: the whole network is connected.
    assert x.grad.abs().sum() > 0
    first = next(p for n, p in params.items() if p.ndim == 4)
    assert first.grad.abs().sum() > 0
    classifier = model.backbone.get_classifier().weight
    assert classifier.shape == (10, model.backbone.num_features)
    assert classifier.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", PIRATES)
def test_pirate_takes_grayscale_and_other_class_counts(arch):
    model = create_classifier(arch, num_classes=7, in_chans=1).eval()
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 7)
    features = timm.create_model(arch, num_classes=0).eval()
    assert features(torch.rand(2, 3, 32, 32)).shape == (2, features.num_features)


def test_paper_size_pirates_are_larger_than_their_cpu_versions():
    sizes = {a: _params(create_classifier(a, 10)) for a in PIRATES}
    for paper, cpu in PAIRS.items():
        assert sizes[paper] > 4 * sizes[cpu], (paper, sizes[paper], cpu, sizes[cpu])
    # Each CPU version stays small enough for the quick grid's minute per run.
    assert all(sizes[cpu] < 1_500_000 for cpu in PAIRS.values()), sizes


def test_paper_size_pirates_are_shaped_for_32x32():
    x = torch.rand(2, 3, 32, 32)
    vgg = timm.create_model("vgg11_cifar", num_classes=10).eval()
    # Five max-pools leave 1x1; the head is a linear layer on 512 features, not the
    # ImageNet 4096-wide 7x7 MLP (VGG-11-BN on CIFAR has ~9.2M weights).
    assert vgg.forward_features(x).shape == (2, 512, 1, 1)
    assert _params(vgg) < 10_000_000
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in vgg.modules()) == 8
    mobile = timm.create_model("mobilenetv2_cifar", num_classes=10).eval()
    assert mobile.forward_features(x).shape == (2, 1280, 4, 4)
    vit = timm.create_model("vit_tiny_cifar", num_classes=10).eval()
    assert vit.patch_embed.patch_size == (4, 4) and vit.embed_dim == 192
    assert len(vit.blocks) == 12 and vit.blocks[0].attn.num_heads == 3
    assert vit.forward_features(x).shape == (2, 65, 192)
    fast = timm.create_model("resnet_fast_cifar", num_classes=10).eval()
    assert fast.forward_features(x).shape == (2, 512, 4, 4)
    assert 6_000_000 < _params(fast) < 7_000_000  # Page's ResNet-9: ~6.5M weights
    air = timm.create_model("resnet_air_cifar", num_classes=10).eval()
    # 32 -> 31 (2x2 whitening, no padding) -> 15 -> 7 -> 3 (three conv-pool blocks).
    assert air.forward_features(x).shape == (2, 256, 3, 3)
    assert 1_900_000 < _params(air) < 2_100_000  # airbench94: ~2.0M weights
    small = timm.create_model("resnet_air_small_cifar", num_classes=10).eval()
    assert small.forward_features(x).shape == (2, 128, 3, 3)


# ----------------------------------------------------------------- airbench options
def _smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, 32, 32) images with correlated neighbouring pixels and channels."""
    g = torch.Generator().manual_seed(seed)
    base = F.interpolate(torch.rand(n, 1, 8, 8, generator=g), size=32, mode="bilinear")
    return (0.9 * base + 0.1 * torch.rand(n, 3, 32, 32, generator=g)).clamp(0, 1)


def _patch_cov(x: torch.Tensor) -> torch.Tensor:
    patches = x.double().unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5)
    patches = patches.reshape(-1, x.shape[1] * 4)
    patches = patches - patches.mean(0)
    return patches.T @ patches / len(patches)


@pytest.mark.parametrize("autocast", [False, True])
def test_whitening_stem_decorrelates_the_patches_of_its_first_batch(autocast):
    from raeg_pl.models.classifier import WhiteningConv

    stem = WhiteningConv(3, eps=5e-4).train()
    x = _smooth_images(64)
    assert not stem.initialised
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        stem(x)
    assert stem.initialised and torch.isfinite(stem.weight).all()
    assert stem.weight.shape == (24, 3, 2, 2)
    # The 12 filters map the 2x2 patches onto their eigenbasis, scaled to variance
    # lambda / (lambda + eps); the other 12 are their negatives.
    eigenvalues = torch.linalg.eigvalsh(_patch_cov(x)).flip(0)
    w = stem.weight[:12].double().reshape(12, 12)
    whitened = w @ _patch_cov(x) @ w.T
    expected = eigenvalues / (eigenvalues + 5e-4)
    assert torch.allclose(whitened.diagonal(), expected, atol=1e-4)
    assert (whitened - torch.diag(whitened.diagonal())).abs().max() < 1e-4
    assert expected.min() < 0.9 < expected.max()  # the eps matters for this data
    assert torch.equal(stem.weight[12:], -stem.weight[:12])


def test_whitening_filters_are_fixed_after_the_first_batch_and_travel_in_checkpoints():
    torch.manual_seed(0)
    model = create_classifier("resnet_air_small_cifar", 10).train()
    stem = model.backbone.stem[0]
    assert "stem.0.weight" not in dict(model.backbone.named_parameters())
    assert stem.bias.requires_grad
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(_smooth_images(16)), torch.arange(16) % 10).backward()
    opt.step()
    filters = stem.weight.clone()
    assert stem.bias.abs().sum() > 0  # the bias trains
    model(_smooth_images(16, seed=1))  # another batch does not set them again
    assert torch.equal(stem.weight, filters)
    fresh = create_classifier("resnet_air_small_cifar", 10)
    fresh.load_state_dict(model.state_dict())
    assert fresh.backbone.stem[0].initialised
    x = _smooth_images(4, seed=2)
    assert torch.allclose(fresh.eval()(x), model.eval()(x), atol=1e-5)


def test_fast_batchnorm_freezes_its_scale_and_speeds_up_its_bias():
    from raeg_pl.models.classifier import FastBatchNorm

    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 5)
    target = torch.randn(8, 4, 5, 5)
    changes = {}
    for scale in (1.0, 8.0):
        bn = FastBatchNorm(4, bias_scale=scale)
        assert not bn.weight.requires_grad and bn.momentum == 0.4 and bn.eps == 1e-12
        opt = torch.optim.SGD([p for p in bn.parameters() if p.requires_grad], lr=0.01)
        F.mse_loss(bn(x), target).backward()
        opt.step()
        # The bias the layer applies is bias_scale * its parameter (zero at the start).
        changes[scale] = bn.bias.detach() * scale
    # With SGD the applied bias moves bias_scale ** 2 times as far.
    assert torch.allclose(changes[8.0], 64 * changes[1.0], rtol=1e-4)
    assert changes[1.0].abs().min() > 0


def test_air_network_convolutions_start_as_identities():
    from raeg_pl.models.classifier import AirResNet

    net = AirResNet((8, 16, 16), num_classes=10, dirac=True)
    convs = [m for m in net.blocks.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 6
    for conv in convs:
        w = conv.weight.detach()
        n = min(conv.in_channels, conv.out_channels)
        identity = torch.zeros_like(w[:n])
        identity[torch.arange(n), torch.arange(n), 1, 1] = 1
        assert torch.equal(w[:n], identity)
        if conv.out_channels > n:  # the widening filters keep their random init
            assert w[n:].abs().sum() > 0
    plain = AirResNet((8, 16, 16), num_classes=10, dirac=False)
    assert plain.blocks[0][0].weight[0, 0, 1, 1] != 1
    with pytest.raises(ValueError, match="three block widths"):
        AirResNet((8, 16), num_classes=10)


def test_air_network_without_whitening_has_a_trained_stem():
    net = timm.create_model("resnet_air_small_cifar", num_classes=10, whiten=False)
    assert isinstance(net.stem[0], torch.nn.Conv2d) and net.stem[0].weight.requires_grad
    assert net.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 10)


# ----------------------------------------------------------------- adversarial training
@pytest.fixture(scope="module")
def cifar_subset(data_root, cache_dir):
    """Real CIFAR-10: 20 training images per class, decoded from the shared cache."""
    dm = ImageClassificationDataModule(
        data_dir=str(data_root),
        cache_dir=str(cache_dir),
        train_per_class=20,
        val_per_class=5,
        test_per_class=5,
        batch_size=32,
        download=False,
    )
    dm.prepare_data()
    dm.setup()
    return dm


def _bn_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k}


@pytest.mark.data
def test_pgd_examples_stay_in_the_ball_and_raise_the_loss(cifar_subset):
    torch.manual_seed(0)
    lit = ClassifierLitModule("resnet_fast_tiny_cifar", adv_train_eps=8, adv_train_steps=5)
    lit.train()
    # The split is stored class by class: draw across all ten classes.
    idx = torch.randperm(len(cifar_subset.train_set), generator=torch.Generator().manual_seed(0))
    images = cifar_subset.train_set.images[idx[:32]].float() / 255
    labels = cifar_subset.train_set.labels[idx[:32]]
    before = _bn_buffers(lit.model)
    adv = lit.adversarial_examples(images, labels)
    # The attack runs on batch statistics but leaves the running ones and the weights alone.
    after = _bn_buffers(lit.model)
    assert before and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in lit.parameters())
    diff = (adv - images).abs()
    assert adv.dtype == torch.float32 and adv.min() >= 0 and adv.max() <= 1
    assert diff.max() <= 8 / 255 + 1e-6
    assert (diff > 1 / 255).float().mean() > 0.5  # most pixels actually moved
    with torch.no_grad():
        clean_loss = F.cross_entropy(lit(images), labels)
        adv_loss = F.cross_entropy(lit(adv), labels)
    assert adv_loss > clean_loss + 0.1, (clean_loss.item(), adv_loss.item())


class _BatchRecorder(L.Callback):
    """Records each clean training batch and every input the network sees for it."""

    def __init__(self) -> None:
        self.clean: list[torch.Tensor] = []
        self.seen: list[list[torch.Tensor]] = []

    def setup(self, trainer, pl_module, stage):
        pl_module.model.register_forward_pre_hook(
            lambda _m, args: self.seen[-1].append(args[0].detach().float().clone())
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.clean.append(batch[0].detach().clone())
        self.seen.append([])


def _fit_two_batches(dm, **lit_kwargs) -> tuple[L.Trainer, _BatchRecorder]:
    torch.manual_seed(0)
    recorder = _BatchRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[recorder],
    )
    lit = ClassifierLitModule("resnet_fast_tiny_cifar", scheduler="none", **lit_kwargs)
    trainer.fit(lit, datamodule=dm)
    return trainer, recorder


@pytest.mark.data
def test_adversarial_training_replaces_each_training_batch(cifar_subset):
    trainer, rec = _fit_two_batches(cifar_subset, adv_train_eps=8, adv_train_steps=3)
    assert len(rec.clean) == 2
    for clean, seen in zip(rec.clean, rec.seen):
        # One clean no-grad pass (train/acc), three attack steps, one training pass.
        assert len(seen) == 5
        assert torch.equal(seen[0], clean)
        trained_on = seen[-1]
        assert not torch.equal(trained_on, clean)
        assert (trained_on - clean).abs().max() <= 8 / 255 + 1e-6
        assert trained_on.min() >= 0 and trained_on.max() <= 1
    metrics = trainer.logged_metrics
    assert 0.0 <= float(metrics["train/adv_acc"]) <= 1.0
    assert 0.0 <= float(metrics["train/acc"]) <= 1.0


@pytest.mark.data
def test_without_adversarial_training_the_batch_is_used_as_given(cifar_subset):
    trainer, rec = _fit_two_batches(cifar_subset)
    for clean, seen in zip(rec.clean, rec.seen):
        assert len(seen) == 1 and torch.equal(seen[0], clean)
    assert "train/adv_acc" not in trainer.logged_metrics
    assert "train/acc" in trainer.logged_metrics


def test_adversarial_training_arguments_are_checked():
    with pytest.raises(ValueError, match="eps >= 0"):
        ClassifierLitModule("resnet_fast_tiny_cifar", adv_train_eps=-1)
    with pytest.raises(ValueError, match="steps >= 1"):
        ClassifierLitModule("resnet_fast_tiny_cifar", adv_train_eps=8, adv_train_steps=0)


# ------------------------------------------------------------------------- compilation
_GRAPHS: list[torch.fx.GraphModule] = []
_COUNTING = "raeg_counting_eager"
if _COUNTING not in list_backends(exclude_tags=()):

    @register_backend(name=_COUNTING)
    def _counting_backend(gm: torch.fx.GraphModule, example_inputs):
        """A torch.compile backend that runs the captured graph eagerly and records it."""
        _GRAPHS.append(gm)
        return gm.forward


def test_compiled_module_keeps_state_dict_keys_and_outputs(tmp_path):
    torch.manual_seed(0)
    plain = ClassifierLitModule("resnet_fast_tiny_cifar").eval()
    compiled = ClassifierLitModule(
        "resnet_fast_tiny_cifar", compile=True, compile_backend=_COUNTING
    ).eval()
    x = torch.rand(2, 3, 32, 32)
    n_graphs = len(_GRAPHS)
    compiled.load_state_dict(plain.state_dict())
    assert torch.allclose(compiled(x), plain(x), atol=1e-5)
    assert len(_GRAPHS) > n_graphs, "the forward pass did not go through torch.compile"
    assert compiled.network() is not compiled.model
    assert list(compiled.state_dict()) == list(plain.state_dict())
    # A checkpoint written by the compiled module loads into an uncompiled classifier.
    torch.save({"state_dict": compiled.state_dict()}, tmp_path / "c.ckpt")
    fresh = create_classifier("resnet_fast_tiny_cifar", 10).to(memory_format=torch.channels_last)
    load_classifier_weights(fresh, tmp_path / "c.ckpt")
    assert torch.allclose(fresh.eval()(x), plain(x), atol=1e-5)


# ----------------------------------------------------------------- test-time flipping
def test_tta_flip_averages_each_image_with_its_mirror():
    torch.manual_seed(0)
    plain = ClassifierLitModule("resnet_fast_tiny_cifar").eval()
    tta = ClassifierLitModule("resnet_fast_tiny_cifar", tta_flip=True).eval()
    tta.load_state_dict(plain.state_dict())
    x = torch.rand(4, 3, 32, 32)
    mirrored = x.flip(-1)
    with torch.no_grad():
        assert torch.equal(plain.eval_logits(x), plain(x))
        assert not torch.allclose(plain(x), plain(mirrored), atol=1e-4)
        averaged = tta.eval_logits(x)
        assert not torch.allclose(averaged, plain(x), atol=1e-4)
        assert torch.allclose(averaged, (plain(x) + plain(mirrored)) / 2, atol=1e-5)
        assert torch.allclose(tta.eval_logits(mirrored), averaged, atol=1e-5)
        assert torch.equal(tta.predict_step((x,), 0), averaged.argmax(dim=1))
