"""What a probe run leaves in its folder and in TensorBoard: heatmaps over layers x timesteps,
per-class F1 and the confusion matrix of the best key, and its features as a projector embedding."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or assumed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from .features import FeatureKey  # noqa: E402

if TYPE_CHECKING:
    from .probe import ProbeModule

PROJECTOR_POINTS = 1000


def _writer(module: ProbeModule):  # noqa: ANN202 - a SummaryWriter or None
    logger = module.trainer.logger
    return logger.experiment if isinstance(logger, TensorBoardLogger) else None


def heatmap_figure(keys: list[FeatureKey], values: torch.Tensor, title: str) -> plt.Figure:
    """Layers (rows, in forward order) x timesteps (columns) of one score per key."""
    layers = list(dict.fromkeys(layer for layer, _ in keys))
    timesteps = list(dict.fromkeys(t for _, t in keys))
    grid = torch.full((len(layers), len(timesteps)), float("nan"))
    for (layer, t), value in zip(keys, torch.as_tensor(values).cpu(), strict=True):
        grid[layers.index(layer), timesteps.index(t)] = value
    figure, axes = plt.subplots(figsize=(1.2 + 0.7 * len(timesteps), 1.0 + 0.32 * len(layers)))
    image = axes.imshow(grid.numpy(), aspect="auto", cmap="viridis")
    axes.set_xticks(range(len(timesteps)), [str(t) for t in timesteps])
    axes.set_yticks(range(len(layers)), layers)
    axes.set_xlabel("timestep")
    axes.set_title(title)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    return figure


def write_heatmaps(module: ProbeModule, folder: Path) -> None:
    if len(module.keys) == 1:  # an encoder's single embedding: the CSV says it all
        return
    writer = _writer(module)
    for metric in ("acc", "macro_f1"):
        values = getattr(module, f"val_{metric}")
        figure = heatmap_figure(module.keys, values, f"validation {metric}")
        figure.savefig(folder / f"probe_heatmap_val_{metric}.png", dpi=120)
        if writer is not None:
            writer.add_figure(f"probe/heatmap_val_{metric}", figure, module.global_step)
        plt.close(figure)


def confusion_figure(matrix: torch.Tensor, class_names: list[str], title: str) -> plt.Figure:
    size = 2 + 0.3 * len(class_names)
    figure, axes = plt.subplots(figsize=(size, size))
    normalized = matrix.double() / matrix.sum(dim=1, keepdim=True).clamp(min=1)
    axes.imshow(normalized.cpu().numpy(), cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(class_names)), class_names, rotation=90, fontsize=6)
    axes.set_yticks(range(len(class_names)), class_names, fontsize=6)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    figure.tight_layout()
    return figure


def write_test_reports(module: ProbeModule, results: dict[str, tuple], folder: Path) -> None:
    """Per-class F1 of the best key (CSV), its confusion matrices and projector embedding."""
    best = module.best_index
    layer, timestep = module.best_key
    with open(folder / "probe_per_class_f1.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["layer", "timestep", "split", "class", "f1"])
        for split, (_, _, per_class, _) in results.items():
            for name, value in zip(module.class_names, per_class[best].tolist(), strict=True):
                writer.writerow([layer, timestep, split, name, f"{value:.6f}"])
    tensorboard = _writer(module)
    if tensorboard is None:
        return
    for split, (*_, matrix) in results.items():
        figure = confusion_figure(
            matrix[best], module.class_names, f"{split}: {layer} t={timestep}"
        )
        tensorboard.add_figure(f"probe/confusion_{split}", figure, module.global_step)
        plt.close(figure)
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
