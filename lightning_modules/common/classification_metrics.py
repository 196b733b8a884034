"""The metrics every classifier of the suite reports, under the same names."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from .module import PlanktonModule


def classification_metrics(num_classes: int) -> MetricCollection:
    """Accuracy (micro), macro-F1 and per-class F1, synced across processes under DDP."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "macro_f1": MulticlassF1Score(num_classes, average="macro"),
            "per_class_f1": MulticlassF1Score(num_classes, average=None),
        }
    )


def loggable(results: dict[str, torch.Tensor], prefix: str, class_names: list[str]) -> dict:
    """Flatten per-class F1 into ``{prefix}/f1/<class>`` scalars next to the summary metrics."""
    flat = {}
    for name, value in results.items():
        if name == "per_class_f1":
            flat.update({f"{prefix}/f1/{c}": v for c, v in zip(class_names, value, strict=True)})
        else:
            flat[f"{prefix}/{name}"] = value
    return flat


class EvalSetClassifier(PlanktonModule):
    """``test`` on the test split and every out-of-distribution set, and ``predict`` as class
    probabilities, for any module whose ``classify(images)`` returns logits."""

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _eval_set_names(self) -> list[str]:
        datamodule = getattr(self.trainer, "datamodule", None)
        return datamodule.eval_set_names if datamodule is not None else ["test"]

    def on_test_start(self) -> None:
        self.test_metrics = nn.ModuleList(
            classification_metrics(len(self.class_names)) for _ in self._eval_set_names()
        ).to(self.device)

    def test_step(self, batch: tuple, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels, _ = batch
        self.test_metrics[dataloader_idx].update(self.classify(images), labels)

    def on_test_epoch_end(self) -> None:
        for name, metrics in zip(self._eval_set_names(), self.test_metrics, strict=True):
            # compute() already syncs across processes; sync_dist only averages equal values.
            self.log_dict(loggable(metrics.compute(), name, self.class_names), sync_dist=True)
            metrics.reset()

    def predict_step(self, batch: tuple, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self.classify(batch[0]).softmax(dim=-1)
