"""LightningModule for image classifiers: surrogate, pirate and authorised models alike."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR
from torchmetrics.classification import MulticlassAccuracy

from raeg_pl.attacks import pgd_linf
from raeg_pl.data.augment import ueraser
from raeg_pl.models.classifier import create_classifier


def warmup_cosine(total_steps: int, warmup_steps: int, final_scale: float = 0.0):
    """LR multiplier: linear warm-up from ~0 to 1, then cosine decay to ``final_scale``."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_scale + (1 - final_scale) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


@contextmanager
def batchnorm_stats_kept(module: nn.Module) -> Iterator[None]:
    """Restores every BatchNorm running statistic of ``module`` on exit.

    Forward passes inside still normalise with batch statistics in training mode; only
    the running averages (and their counters) they update are put back afterwards.
    """
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [[b.clone() for b in m.buffers(recurse=False)] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, bufs in zip(norms, saved):
                for b, kept in zip(m.buffers(recurse=False), bufs):
                    b.copy_(kept)


#: Training-batch augmentations of :class:`ClassifierLitModule` (``train_augment``).
TRAIN_AUGMENTS = ("none", "ueraser")


class ClassifierLitModule(L.LightningModule):
    """Trains and evaluates one timm classifier on [0, 1] images.

    Args:
        arch: timm model name (see :func:`raeg_pl.models.classifier.create_classifier`).
        num_classes: classes; linked from the data module by the CLI.
        in_chans: input channels; linked from the data module by the CLI.
        optimizer: ``"sgd"`` (Nesterov momentum) or ``"adamw"``.
        lr: peak learning rate.
        weight_decay: decoupled for AdamW, L2 for SGD; not applied to norms and biases.
        momentum: SGD momentum.
        scheduler: ``"cosine"`` (linear warm-up then cosine), ``"onecycle"`` or ``"none"``.
        warmup_epochs: warm-up length for ``"cosine"`` (fractional epochs allowed).
        label_smoothing: cross-entropy label smoothing.
        channels_last: run the network in channels-last memory format.
        checkpoint_path: optional local weights to start from.
        timm_kwargs: extra ``timm.create_model`` arguments.
        adv_train_eps: L-inf radius of PGD adversarial training in 8-bit levels (x/255);
            0 trains on the batches as given. With a radius, every training batch is
            replaced by PGD examples against the current network (Madry et al., "Towards
            deep learning models resistant to adversarial attacks", ICLR 2018): the
            pirate's adversarial-training defence.
        adv_train_steps: PGD steps per batch.
        adv_train_step_size: PGD step in 8-bit levels; default ``2.5 * eps / steps``, so
            the iterate can cross the whole eps-ball from its random start.
        compile: run the network through ``torch.compile``; meant for GPU runs (the CPU
            profiles leave it off). Only a reference is compiled: ``self.model`` and the
            checkpoint keys stay as without it.
        compile_backend: ``torch.compile`` backend (``"eager"`` traces without code
            generation, e.g. to check a model compiles).
        tta_flip: evaluate (validation, test, predict) on the mean of the logits of each
            image and its horizontal mirror.
        train_augment: extra augmentation of every training batch on its device, after
            the data module's crop and flip: ``"none"``, or ``"ueraser"``, UEraser-style
            strong augmentation (:func:`raeg_pl.data.augment.ueraser`: plasma brightness
            and contrast, channel shuffle, posterisation, random erasing, then mixup or
            CutMix), trained with the cross-entropy of its soft labels: the pirate's
            strong-augmentation defence. Not combined with adversarial training.
    """

    def __init__(
        self,
        arch: str = "resnet_tiny_cifar",
        num_classes: int = 10,
        in_chans: int = 3,
        optimizer: str = "sgd",
        lr: float = 0.1,
        weight_decay: float = 5e-4,
        momentum: float = 0.9,
        scheduler: str = "onecycle",
        warmup_epochs: float = 1.0,
        label_smoothing: float = 0.1,
        channels_last: bool = True,
        checkpoint_path: str | None = None,
        timm_kwargs: dict | None = None,
        adv_train_eps: float = 0.0,
        adv_train_steps: int = 5,
        adv_train_step_size: float | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
        tta_flip: bool = False,
        train_augment: str = "none",
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        if scheduler not in ("cosine", "onecycle", "none"):
            raise ValueError(f"scheduler must be 'cosine', 'onecycle' or 'none', got {scheduler!r}")
        if adv_train_eps < 0 or adv_train_steps < 1:
            raise ValueError(
                f"adversarial training needs eps >= 0 and steps >= 1, got "
                f"eps={adv_train_eps}, steps={adv_train_steps}"
            )
        if train_augment not in TRAIN_AUGMENTS:
            raise ValueError(
                f"train_augment must be one of {TRAIN_AUGMENTS}, got {train_augment!r}"
            )
        if train_augment != "none" and adv_train_eps > 0:
            raise ValueError(
                f"train_augment={train_augment!r} and adversarial training "
                f"(adv_train_eps={adv_train_eps}) do not combine: choose one"
            )
        self.save_hyperparameters()
        self.model = create_classifier(
            arch,
            num_classes,
            in_chans=in_chans,
            checkpoint_path=checkpoint_path,
            **(timm_kwargs or {}),
        )
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.train_adv_acc = MulticlassAccuracy(num_classes, average="micro")

    def network(self) -> nn.Module:
        """The module forward passes run: ``self.model``, or its compiled reference.

        The compiled wrapper shares ``self.model``'s parameters and is kept out of the
        module tree (``__dict__``, not a submodule), so ``state_dict`` keys, checkpoints
        and ``.to()`` are the same with and without ``compile``. It is rebuilt if
        ``self.model`` is replaced.
        """
        if not self.hparams.compile:
            return self.model
        compiled = self.__dict__.get("_compiled_model")
        if compiled is None or compiled._orig_mod is not self.model:
            compiled = torch.compile(self.model, backend=self.hparams.compile_backend)
            self.__dict__["_compiled_model"] = compiled
        return compiled

    def __getstate__(self) -> dict:
        # A compiled wrapper does not pickle (spawned processes); it is rebuilt on demand.
        state = super().__getstate__()
        state.pop("_compiled_model", None)
        return state

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) for images (B, C, H, W) float in [0, 1]."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.network()(images)

    def eval_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Evaluation logits (B, classes) for images (B, C, H, W) float in [0, 1].

        With ``tta_flip`` the mean of the logits of each image and of its horizontal
        mirror (one forward pass over both), so mirrored inputs give the same logits.
        """
        if not self.hparams.tta_flip:
            return self(images)
        logits, mirrored = self(torch.cat([images, images.flip(-1)])).chunk(2)
        return (logits + mirrored) / 2

    def adversarial_examples(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L-inf PGD examples against the current network (Madry et al., ICLR 2018).

        A uniform random start in the eps-ball (drawn from the default generator of the
        images' device), then ``adv_train_steps`` signed-gradient ascent steps on the
        cross-entropy, each projected back onto the eps-ball around ``images`` and onto
        [0, 1] (:func:`raeg_pl.attacks.pgd_linf`).

        The network stays in its current mode. In training, BatchNorm normalises with the
        batch statistics, so the attack targets exactly the function the training step
        then optimises (eval mode would attack running averages that lag behind early in
        training); the running statistics the attack passes update are restored
        (:func:`batchnorm_stats_kept`), so only the training forward moves them. Dropout,
        where present, draws fresh masks per pass. Under bf16 autocast the network runs in
        bf16, the loss is taken in float32 and the iterate stays float32; only the sign of
        its gradient is used. Parameter gradients are never accumulated.

        Args:
            images: (B, C, H, W) float in [0, 1].
            labels: (B,) int64 true labels.

        Returns:
            (B, C, H, W) float in [0, 1], within ``adv_train_eps / 255`` of ``images``
            (L-inf), detached.
        """
        hp = self.hparams
        eps = hp.adv_train_eps / 255
        step_levels = hp.adv_train_step_size
        if step_levels is None:
            step_levels = 2.5 * hp.adv_train_eps / hp.adv_train_steps
        step = step_levels / 255
        with batchnorm_stats_kept(self.model):
            return pgd_linf(
                images.detach(),
                lambda x: F.cross_entropy(self(x).float(), labels),
                eps=eps,
                step_size=step,
                steps=hp.adv_train_steps,
                random_start=True,
            )

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        adversarial = self.hparams.adv_train_eps > 0
        if adversarial:
            # train/acc stays the clean-batch accuracy, comparable with plain training;
            # train/adv_acc is the accuracy on the PGD batch the step trains on.
            with torch.no_grad(), batchnorm_stats_kept(self.model):
                self.train_acc(self(images), labels)
            images = self.adversarial_examples(images, labels)
        # The loss's targets: the labels, or the soft labels of a mixed batch.
        targets = labels
        if self.hparams.train_augment == "ueraser":
            images, targets = ueraser(images, labels, self.hparams.num_classes)
        logits = self(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        if adversarial:
            self.train_adv_acc(logits.detach(), labels)
            self.log("train/adv_acc", self.train_adv_acc, on_step=False, on_epoch=True)
        else:
            # On a mixed batch, accuracy against each image's larger share.
            hard = targets.argmax(1) if targets.ndim == 2 else labels
            self.train_acc(logits.detach(), hard)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch, stage: str, metric: MulticlassAccuracy) -> None:
        images, labels = batch
        logits = self.eval_logits(images)
        metric(logits, labels)
        self.log(
            f"{stage}/loss",
            F.cross_entropy(logits, labels),
            sync_dist=True,
            add_dataloader_idx=False,
        )
        self.log(f"{stage}/acc", metric, prog_bar=True, add_dataloader_idx=False)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:
            self._eval_step(batch, "val", self.val_acc)
            return
        # A second validation loader is the clean test split (peak-accuracy curves).
        images, labels = batch
        self.val_test_acc(self.eval_logits(images), labels)
        self.log("val/test_acc", self.val_test_acc, add_dataloader_idx=False)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch, batch_idx: int):
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.eval_logits(images).argmax(dim=1)

    def configure_optimizers(self):
        hp = self.hparams
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (no_decay if p.ndim <= 1 else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=True)
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr)
        if hp.scheduler == "none":
            return opt
        total = int(self.trainer.estimated_stepping_batches)
        # OneCycleLR needs a few steps on each side of its peak; tiny smoke runs fall back.
        if hp.scheduler == "onecycle" and total >= 8:
            sched = OneCycleLR(
                opt,
                max_lr=hp.lr,
                total_steps=total,
                pct_start=0.25,
                anneal_strategy="linear",
                div_factor=10,
                final_div_factor=100,
            )
        else:
            steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
            sched = LambdaLR(opt, warmup_cosine(total, int(hp.warmup_epochs * steps_per_epoch)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
