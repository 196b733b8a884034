"""What a probe run leaves in its folder and in TensorBoard, written from plain results: the
table of every key's scores, the weight-decay grid, heatmaps over layers x timesteps, per-class
F1 and the confusion matrix of the best key, and its features as a projector embedding."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger

from datamodules.store import write_csv_atomic

from ..common.figures import confusion_figure, heatmap_figure, save_figure
from .features import FeatureKey
from .grid_metrics import GridScores

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

RESULT_COLUMNS = ["layer", "timestep", "split", "accuracy", "macro_f1", "converged", "best"]
PROJECTOR_POINTS = 1000


@dataclass(frozen=True)
class ProbeResults:
    """The scores of a probe's heads, and what names them.

    ``validation`` scores the keys' heads; each of ``tests`` (one per evaluation set) scores
    them followed by the fusion head of ``fusion_keys`` (indices into ``keys``; empty without
    fusion). ``decay_scores`` holds the validation score of every weight decay of the grid
    (empty without a grid), ``weight_decay`` the one kept.
    """

    keys: list[FeatureKey]
    class_names: list[str]
    best: int
    converged: list[bool]
    fusion_keys: list[int]
    select_metric: str
    weight_decay: float
    decay_scores: dict[float, float]
    validation: GridScores
    tests: dict[str, GridScores] = field(default_factory=dict)

    @property
    def best_key(self) -> FeatureKey:
        return self.keys[self.best]


@dataclass(frozen=True)
class Projection:
    """Test images for TensorBoard's projector: the best key's ``features`` ``(points, width)``,
    their ``labels`` and the ``images`` in [-1, 1]."""

    features: torch.Tensor
    labels: torch.Tensor
    images: torch.Tensor


def tensorboard_writer(logger: Logger | None) -> SummaryWriter | None:
    """The logger's TensorBoard writer, if it is a TensorBoard logger."""
    return logger.experiment if isinstance(logger, TensorBoardLogger) else None


def write_fit_reports(
    folder: Path, results: ProbeResults, tensorboard: SummaryWriter | None, step: int
) -> None:
    """What fitting leaves: the validation rows of the table, the decay grid, the heatmaps."""
    write_results_table(folder, results)
    if results.decay_scores:
        write_decay_grid(folder, results)
    write_heatmaps(folder, results.keys, results.validation, tensorboard, step)


def write_test_reports(
    folder: Path,
    results: ProbeResults,
    tensorboard: SummaryWriter | None,
    step: int,
    projection: Callable[[], Projection | None],
) -> None:
    """What testing leaves: the table (the validation scores travel in the checkpoint, so a
    test run's table has them too), the best key's per-class F1 and, with a TensorBoard, its
    confusion matrices and the ``projection`` (called only then: it reads the test features)."""
    write_results_table(folder, results)
    write_per_class_f1(folder, results)
    if tensorboard is None:
        return
    write_confusions(tensorboard, results, step)
    points = projection()
    if points is not None:
        write_projector(tensorboard, results, points, step)


def write_results_table(folder: Path, results: ProbeResults) -> None:
    """Add or replace the rows of ``results``' splits in ``probe_results.csv``."""
    path = folder / "probe_results.csv"
    splits = {"val": results.validation} | results.tests
    rows = []
    if path.exists():
        with open(path, newline="") as handle:
            kept = [row for row in csv.DictReader(handle) if row["split"] not in splits]
        rows = [[row[column] for column in RESULT_COLUMNS] for row in kept]
    keys = results.keys
    fused = "+".join(f"{keys[i][0]}@{keys[i][1]}" for i in results.fusion_keys)
    for split, scores in splits.items():
        for i, (layer, timestep) in enumerate(keys):
            timestep = "" if timestep is None else timestep
            accuracy, macro_f1 = _scores(scores, i)
            converged = results.converged[i]
            rows.append([layer, timestep, split, accuracy, macro_f1, converged, i == results.best])
        if len(scores.acc) > len(keys):
            rows.append([f"fusion({fused})", "", split, *_scores(scores, -1), "", False])
    write_csv_atomic(path, RESULT_COLUMNS, rows)


def _scores(scores: GridScores, head: int) -> list[str]:
    return [f"{scores.acc[head].item():.6f}", f"{scores.macro_f1[head].item():.6f}"]


def write_decay_grid(folder: Path, results: ProbeResults) -> None:
    """The validation score of every weight decay tried, and the one kept."""
    chosen = results.weight_decay
    rows = [[d, f"{s:.6f}", d == chosen] for d, s in sorted(results.decay_scores.items())]
    header = ["weight_decay", f"val_best_{results.select_metric}", "chosen"]
    write_csv_atomic(folder / "weight_decay_grid.csv", header, rows)


def write_heatmaps(
    folder: Path,
    keys: list[FeatureKey],
    scores: GridScores,
    tensorboard: SummaryWriter | None,
    step: int,
) -> None:
    """The validation ``scores`` over layers x timesteps, as PNGs and in ``tensorboard``."""
    if len(keys) == 1:  # an encoder's single embedding: the CSV says it all
        return
    for metric in ("acc", "macro_f1"):
        figure = heatmap_figure(keys, getattr(scores, metric), f"validation {metric}")
        if tensorboard is not None:
            tensorboard.add_figure(f"probe/heatmap_val_{metric}", figure, step, close=False)
        save_figure(figure, folder / f"probe_heatmap_val_{metric}.png")


def write_per_class_f1(folder: Path, results: ProbeResults) -> None:
    """Per-class F1 of the best key on every split (``probe_per_class_f1.csv``)."""
    layer, timestep = results.best_key
    write_csv_atomic(
        folder / "probe_per_class_f1.csv",
        ["layer", "timestep", "split", "class", "f1"],
        [
            [layer, timestep, split, name, f"{value:.6f}"]
            for split, scores in results.tests.items()
            for name, value in zip(
                results.class_names, scores.per_class_f1[results.best].tolist(), strict=True
            )
        ],
    )


def write_confusions(tensorboard: SummaryWriter, results: ProbeResults, step: int) -> None:
    """The confusion matrix of the best key on every split, in ``tensorboard``."""
    layer, timestep = results.best_key
    for split, scores in results.tests.items():
        figure = confusion_figure(
            scores.confusion[results.best], results.class_names, f"{split}: {layer} t={timestep}"
        )
        tensorboard.add_figure(f"probe/confusion_{split}", figure, step)


def write_projector(
    tensorboard: SummaryWriter, results: ProbeResults, points: Projection, step: int
) -> None:
    """The best key's features of test images as a TensorBoard projector embedding."""
    layer, timestep = results.best_key
    images = points.images
    images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    tensorboard.add_embedding(
        points.features,
        metadata=[results.class_names[i] for i in points.labels.tolist()],
        label_img=((images + 1) / 2).clamp(0, 1),
        global_step=step,
        tag=f"probe/best_key_{layer}_t{timestep}",
    )
