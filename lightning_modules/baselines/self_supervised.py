"""What SimCLR and DINO share: a timm backbone trained without labels, an online linear classifier
on detached features and a kNN monitor, both logged under fixed names so that a run can be judged
before the offline probe (the lightly and solo-learn recipe)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from ..common.classification_metrics import EvalSetClassifier
from ..common.schedules import scaled_lr, warmup_cosine
from .backbones import create_backbone
from .collapse import CollapseMonitor, embedding_std_ratio
from .knn import KNNAccuracy


class SelfSupervisedModule(EvalSetClassifier):
    """Base of the self-supervised methods; a subclass implements ``ssl_step``, and may build
    another encoder than a timm ResNet by overriding ``build_backbone``. The data's number of
    classes serves only the online classifier and the kNN monitor.

    Args:
        backbone: a timm model name, never pretrained.
        lr: AdamW learning rate for a global batch of 256, scaled linearly.
        weight_decay: AdamW weight decay (none on the online classifier).
        warmup_epochs: linear warm-up before the cosine decay.
        knn_k: neighbours of the kNN monitor.
        online_lr: the online classifier's own learning rate (global batch of 256): a linear
            head on fixed-scale features wants a larger one than the backbone, or the monitor
            lags behind the features it measures.
        small_input_stem: a 3x3 stride-1 stem without max-pool for small images (see
            ``create_backbone``).
        **data: the data's settings (``PlanktonModule``).
    """

    # The collapse signals this method updates (``lightning_modules/baselines/collapse.py``).
    collapse_signals: tuple[str, ...] = ("embedding_std_ratio",)

    def __init__(
        self,
        backbone: str = "resnet18",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        warmup_epochs: int = 1,
        knn_k: int = 20,
        online_lr: float = 0.004,
        small_input_stem: bool = False,
        **data: object,
    ) -> None:
        super().__init__(**data)
        num_classes = len(self.class_names)
        self.backbone = self.build_backbone()
        self.online_classifier = nn.Linear(self.backbone.num_features, num_classes)
        self.online_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.knn = KNNAccuracy(num_classes, k=knn_k)
        self.collapse = CollapseMonitor(self.collapse_signals)

    def build_backbone(self) -> nn.Module:
        """The encoder trained without labels: images to pooled features ``(B, num_features)``,
        with a ``num_features`` attribute. Called once, once ``self.hparams`` holds every
        setting."""
        settings = self.hparams
        return create_backbone(settings.backbone, settings.in_chans, 0, settings.small_input_stem)

    def encoders(self) -> dict[str, nn.Module]:
        """The networks that probes and clustering may read, by name; the first by default."""
        return {"backbone": self.backbone}

    def ssl_step(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, backbone features of the first view)``."""
        raise NotImplementedError

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        return self.online_classifier(self.backbone(images))

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        views, labels, _ = batch
        loss, features = self.ssl_step(views)
        # Detached: the online classifier measures the features, it must not shape them.
        online_loss = F.cross_entropy(self.online_classifier(features.detach()), labels)
        self.knn.update(train_features=features, train_labels=labels)
        self.collapse.update("embedding_std_ratio", embedding_std_ratio(features))
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/online_loss", online_loss)
        return loss + online_loss

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        images, labels, _ = batch
        features = self.backbone(images)
        self.online_accuracy.update(self.online_classifier(features), labels)
        self.knn.update(test_features=features, test_labels=labels)

    def on_validation_epoch_end(self) -> None:
        self.log("val/online_acc", self.online_accuracy.compute(), prog_bar=True, sync_dist=True)
        if self.knn.has_bank():  # only in fit: a bare validate has trained on nothing
            self.log("val/knn_acc", self.knn.compute(), prog_bar=True, sync_dist=True)
        self.online_accuracy.reset()
        self.knn.reset()

    def on_train_epoch_start(self) -> None:
        self.knn.reset()  # the bank holds this epoch's features only

    def on_train_epoch_end(self) -> None:
        for name, value in self.collapse.end_epoch().items():
            self.log(f"train/{name}", value)

    def on_train_end(self) -> None:
        collapsed = self.collapse.collapsed()
        if collapsed:
            rank_zero_warn(
                f"{type(self).__name__} looks collapsed after its last epoch: "
                f"{'; '.join(collapsed)}. Its features carry little information about the "
                "images: train longer, or see the README (baselines) for the small-image recipe"
            )

    def collapse_report(self) -> dict:
        """The last epoch's collapse signals and those that say collapsed (for the report)."""
        return {"signals": dict(self.collapse.last), "collapsed": self.collapse.collapsed()}

    def configure_optimizers(self) -> dict:
        classifier = set(self.online_classifier.parameters())
        groups = [
            {"params": [p for p in self.parameters() if p.requires_grad and p not in classifier]},
            {
                "params": list(classifier),
                "weight_decay": 0.0,
                "lr": scaled_lr(self.trainer, self.hparams.online_lr),
            },
        ]
        optimizer = torch.optim.AdamW(
            groups,
            lr=scaled_lr(self.trainer, self.hparams.lr),
            weight_decay=self.hparams.weight_decay,
        )
        return warmup_cosine(optimizer, self.trainer, self.hparams.warmup_epochs)
