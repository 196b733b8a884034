"""``SupervisedModule``: the supervised baseline, a timm ResNet trained from scratch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.views import Recipe, View, Views

from ..common.classification_metrics import (
    CalibratedClassifier,
    EvalSetClassifier,
    classification_metrics,
    loggable,
)
from ..common.schedules import scaled_lr, warmup_cosine
from .backbones import PooledFeatures, create_backbone


def supervised_view(image_size: int, channels: int) -> View:
    """Standard augmentation for a classifier trained from scratch on small images."""
    recipe = Recipe(
        size=image_size,
        scale=(0.6, 1.0),
        ratio=(0.8, 1.25),
        jitter_prob=1.0,
        brightness=0.2,
        contrast=0.2,
    )
    return Views(((recipe, 1),), as_list=False)


class SupervisedModule(CalibratedClassifier, EvalSetClassifier):
    """Cross-entropy classifier on a timm backbone, with the suite's metrics on every eval set.

    Args:
        backbone: a timm model name (``resnet18``, ``resnet50``...); never pretrained, since
            nothing is downloaded.
        lr: peak AdamW learning rate for a batch of 256, scaled linearly by the global batch.
        weight_decay: AdamW weight decay.
        warmup_epochs: linear warm-up before the cosine decay.
        label_smoothing: cross-entropy label smoothing.
        class_balanced_loss: weight the loss by inverse class frequency (long-tailed data).
        small_input_stem: a 3x3 stride-1 stem without max-pool for small images; None picks it
            for a ResNet at 64 px or below (see ``create_backbone``).
        backbone_args: more arguments of ``timm.create_model`` (depth, width...).
        **data: the data's settings (``PlanktonModule``).
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_epochs: int = 1,
        label_smoothing: float = 0.1,
        class_balanced_loss: bool = False,
        small_input_stem: bool | None = None,
        backbone_args: dict | None = None,
        **data: object,
    ) -> None:
        super().__init__(**data)
        num_classes = len(self.class_names)
        self.model = create_backbone(
            backbone,
            self.hparams.in_chans,
            num_classes,
            small_input_stem,
            self.hparams.image_size,
            backbone_args,
        )
        self.register_buffer("class_weights", torch.ones(num_classes))
        self.val_metrics = classification_metrics(num_classes)

    def train_view(self, image_size: int, channels: int) -> View:
        return supervised_view(image_size, channels)

    def encoders(self) -> dict[str, nn.Module]:
        """The pooled features before the classifier, for probes and clustering."""
        return {"model": PooledFeatures(self.model)}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if stage == "fit" and self.hparams.class_balanced_loss and datamodule is not None:
            self.class_weights.copy_(datamodule.class_weights)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        images, labels, _ = batch
        loss = F.cross_entropy(
            self(images),
            labels,
            weight=self.class_weights,
            label_smoothing=self.hparams.label_smoothing,
        )
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        images, labels, _ = batch
        logits = self(images)
        self.log("val/loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.val_metrics.update(logits, labels)

    def on_validation_epoch_end(self) -> None:
        # compute() already syncs across processes; sync_dist only averages equal values.
        results = loggable(self.val_metrics.compute(), "val", self.class_names)
        self.log_dict(results, sync_dist=True)
        self.val_metrics.reset()

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self(images)

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(
            self.parameters(),
            lr=scaled_lr(self.trainer, self.hparams.lr),
            weight_decay=self.hparams.weight_decay,
        )
        return warmup_cosine(optimizer, self.trainer, self.hparams.warmup_epochs)
