"""LightningModule for image classifiers: surrogate, pirate and authorised models alike."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR
from torchmetrics.classification import MulticlassAccuracy

from raeg_pl.models.classifier import create_classifier


def warmup_cosine(total_steps: int, warmup_steps: int, final_scale: float = 0.0):
    """LR multiplier: linear warm-up from ~0 to 1, then cosine decay to ``final_scale``."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return final_scale + (1 - final_scale) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


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
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        if scheduler not in ("cosine", "onecycle", "none"):
            raise ValueError(f"scheduler must be 'cosine', 'onecycle' or 'none', got {scheduler!r}")
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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) for images (B, C, H, W) float in [0, 1]."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.model(images)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        self.train_acc(logits.detach(), labels)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch, stage: str, metric: MulticlassAccuracy) -> None:
        images, labels = batch
        logits = self(images)
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
        self.val_test_acc(self(images), labels)
        self.log("val/test_acc", self.val_test_acc, add_dataloader_idx=False)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def predict_step(self, batch, batch_idx: int):
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).argmax(dim=1)

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
