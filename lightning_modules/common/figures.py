"""Every figure of the suite, drawn one way for TensorBoard, the probe's folder, the CLI and the
experiment report: image grids, heatmaps over layers x timesteps, confusion matrices, true
against estimated class fractions."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display is needed or assumed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402


def image_grid(images: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Images in [-1, 1] as one uint8 grid ``(C, H, W)``."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    per_row = rows or max(1, round(len(images) ** 0.5))
    return make_grid(images, nrow=per_row, padding=2, pad_value=255)


def save_grid(images: torch.Tensor, path: str | Path) -> None:
    """Write images in [-1, 1] as one PNG grid."""
    Image.fromarray(image_grid(images).permute(1, 2, 0).numpy()).save(path)


def heatmap_figure(
    keys: Sequence[tuple[str, int | None]], values: torch.Tensor, title: str
) -> plt.Figure:
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


def confusion_figure(matrix: torch.Tensor, class_names: list[str], title: str) -> plt.Figure:
    """Row-normalised confusion matrix ``(true, predicted)``."""
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


def abundance_figure(
    true: Sequence[float], estimates: Mapping[str, Sequence[float]], title: str
) -> plt.Figure:
    """Estimated against true fraction, one point per class and one marker per estimator, with
    the line y = x on which an exact count lies."""
    figure, axes = plt.subplots(figsize=(4.5, 4.5))
    top = 1.05 * max(max(true), *(max(fractions) for fractions in estimates.values()))
    axes.plot([0, top], [0, top], color="0.6", linewidth=1, label="y = x")
    for (name, fractions), marker in zip(estimates.items(), itertools.cycle("osD^v")):
        axes.scatter(true, fractions, marker=marker, s=24, alpha=0.75, label=name)
    axes.set_xlim(0, top)
    axes.set_ylim(0, top)
    axes.set_aspect("equal")
    axes.set_xlabel("true fraction")
    axes.set_ylabel("estimated fraction")
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def save_figure(figure: plt.Figure, path: str | Path) -> None:
    """Write ``figure`` as a PNG and free it (pyplot keeps every open figure alive)."""
    figure.savefig(path, dpi=120)
    plt.close(figure)
