"""What SimCLR and DINO share: a timm backbone trained without labels, an online linear classifier
on detached features and a kNN monitor, both logged under fixed names so that a run can be judged
before the offline probe (the lightly and solo-learn recipe)."""

from __future__ import annotations

from functools import partial

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

# The optimisers a self-supervised method may name, with what each fixes.
OPTIMIZERS = {
    "sgd": partial(torch.optim.SGD, momentum=0.9),
    "adamw": torch.optim.AdamW,
}


class SelfSupervisedModule(EvalSetClassifier):
    """Base of the self-supervised methods; a subclass implements ``ssl_step``, and may build
    another encoder than a timm ResNet by overriding ``build_backbone``. The data's number of
    classes serves only the online classifier and the kNN monitor.

    The defaults are the small-image recipe of lightly's CIFAR-10 benchmark, where SimCLR and
    DINO on a ResNet-18 reach kNN accuracies of 0.847 and 0.840: SGD with momentum 0.9, weight
    decay 5e-4, a cosine schedule without warm-up, and the small-input stem at 32 px. Its rate,
    0.06 per 128 images, is for 200 epochs; at the short budgets a CPU affords, 1.0 per 256
    learns far more (``docs/tuning/simclr.md``), so that is the default. lightly's ImageNet
    benchmarks use LARS at 0.3 x sqrt(batch) instead, a large-batch optimiser that small batches
    on one CPU or GPU do not need.

    Args:
        backbone: a timm model name, never pretrained.
        optimizer: ``sgd`` (momentum 0.9) or ``adamw``.
        lr: learning rate for a global batch of 256, scaled linearly (1.0, chosen on validation
            at 2 to 25 epochs; lightly's CIFAR-10 0.12 suits 200 epochs).
        weight_decay: weight decay (none on the online classifier).
        warmup_epochs: linear warm-up before the cosine decay.
        knn_k: neighbours of the kNN monitor.
        online_lr: the online classifier's own learning rate (global batch of 256); None uses
            ``lr``, as lightly does. Under AdamW a linear head on fixed-scale features wants a
            larger one than the backbone, or the monitor lags behind the features it measures.
        small_input_stem: a 3x3 stride-1 stem without max-pool for small images; None picks it
            for a ResNet at 64 px or below (see ``create_backbone``).
        backbone_args: more arguments of ``timm.create_model`` (depth, width...).
        **data: the data's settings (``PlanktonModule``).
    """

    # The collapse signals this method updates (``lightning_modules/baselines/collapse.py``).
    collapse_signals: tuple[str, ...] = ("embedding_std_ratio",)

    def __init__(
        self,
        backbone: str = "resnet18",
        optimizer: str = "sgd",
        lr: float = 1.0,
        weight_decay: float = 5e-4,
        warmup_epochs: int = 0,
        knn_k: int = 20,
        online_lr: float | None = None,
        small_input_stem: bool | None = None,
        backbone_args: dict | None = None,
        **data: object,
    ) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
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
        return create_backbone(
            settings.backbone,
            settings.in_chans,
            small_input_stem=settings.small_input_stem,
            image_size=settings.image_size,
            backbone_args=settings.backbone_args,
        )

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
                "images: train longer, or see docs/methods.md (small-image recipes)"
            )

    def collapse_report(self) -> dict:
        """The last epoch's collapse signals and those that say collapsed (for the report)."""
        return {"signals": dict(self.collapse.last), "collapsed": self.collapse.collapsed()}

    def configure_optimizers(self) -> dict:
        settings = self.hparams
        classifier = set(self.online_classifier.parameters())
        online_lr = settings.lr if settings.online_lr is None else settings.online_lr
        groups = [
            {"params": [p for p in self.parameters() if p.requires_grad and p not in classifier]},
            {
                "params": list(classifier),
                "weight_decay": 0.0,
                "lr": scaled_lr(self.trainer, online_lr),
            },
        ]
        optimizer = OPTIMIZERS[settings.optimizer](
            groups, lr=scaled_lr(self.trainer, settings.lr), weight_decay=settings.weight_decay
        )
        return warmup_cosine(optimizer, self.trainer, self.hparams.warmup_epochs)
