"""The metrics every classifier of the suite reports, under the same names."""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score


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
