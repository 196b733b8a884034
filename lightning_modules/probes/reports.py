"""What a probe run leaves in its folder and in TensorBoard: heatmaps over layers x timesteps,
per-class F1 and the confusion matrix of the best key, and its features as a projector embedding."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.loggers import TensorBoardLogger

from datamodules.store import write_csv_atomic

from ..common.figures import confusion_figure, heatmap_figure, save_figure
from .grid_metrics import GridScores

if TYPE_CHECKING:
    from .probe import ProbeModule

PROJECTOR_POINTS = 1000


def _writer(module: ProbeModule):  # noqa: ANN202 - a SummaryWriter or None
    logger = module.trainer.logger
    return logger.experiment if isinstance(logger, TensorBoardLogger) else None


def write_heatmaps(module: ProbeModule, folder: Path) -> None:
    if len(module.keys) == 1:  # an encoder's single embedding: the CSV says it all
        return
    writer = _writer(module)
    for metric in ("acc", "macro_f1"):
        values = getattr(module, f"val_{metric}")
        figure = heatmap_figure(module.keys, values, f"validation {metric}")
        if writer is not None:
            writer.add_figure(
                f"probe/heatmap_val_{metric}", figure, module.global_step, close=False
            )
        save_figure(figure, folder / f"probe_heatmap_val_{metric}.png")


def write_test_reports(module: ProbeModule, results: dict[str, GridScores], folder: Path) -> None:
    """Per-class F1 of the best key (CSV), its confusion matrices and projector embedding."""
    best = module.best_index
    layer, timestep = module.best_key
    write_csv_atomic(
        folder / "probe_per_class_f1.csv",
        ["layer", "timestep", "split", "class", "f1"],
        [
            [layer, timestep, split, name, f"{value:.6f}"]
            for split, scores in results.items()
            for name, value in zip(
                module.class_names, scores.per_class_f1[best].tolist(), strict=True
            )
        ],
    )
    tensorboard = _writer(module)
    if tensorboard is None:
        return
    for split, scores in results.items():
        figure = confusion_figure(
            scores.confusion[best], module.class_names, f"{split}: {layer} t={timestep}"
        )
        tensorboard.add_figure(f"probe/confusion_{split}", figure, module.global_step)
    dataset = module.trainer.datamodule.dataset("test")
    count = min(PROJECTOR_POINTS, len(dataset))
    if count == 0:
        return
    features, labels = module._collect("test")
    images = torch.stack([dataset[i][0] for i in range(count)])
    images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    tensorboard.add_embedding(
        features[best, :count, : module.valid[best].sum()].cpu(),
        metadata=[module.class_names[i] for i in labels[:count].tolist()],
        label_img=((images + 1) / 2).clamp(0, 1),
        global_step=module.global_step,
        tag=f"probe/best_key_{layer}_t{timestep}",
    )
