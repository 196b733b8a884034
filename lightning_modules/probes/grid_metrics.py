"""Classification metrics of many probe heads at once.

One torchmetrics ``Metric`` holds a confusion matrix per head ``(heads, classes, classes)``,
updated with a single ``bincount`` for the whole grid and summed across processes under DDP; the
scores come from the matrices with tensor operations, never a Python loop over heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchmetrics import Metric


class GridConfusion(Metric):
    """Confusion matrices of ``num_heads`` classifiers evaluated on the same targets."""

    full_state_update = False

    def __init__(self, num_heads: int, num_classes: int) -> None:
        super().__init__()
        self.num_heads, self.num_classes = num_heads, num_classes
        self.add_state(
            "matrix",
            torch.zeros(num_heads, num_classes, num_classes, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """``preds`` ``(heads, batch)`` class indices, ``target`` ``(batch,)``."""
        c = self.num_classes
        heads = torch.arange(self.num_heads, device=preds.device)[:, None]
        cells = heads * c * c + target[None, :] * c + preds
        counts = torch.bincount(cells.flatten(), minlength=self.num_heads * c * c)
        self.matrix += counts.reshape(self.num_heads, c, c)

    def compute(self) -> torch.Tensor:
        return self.matrix


@dataclass(frozen=True)
class GridScores:
    """Scores of every head: ``acc`` and ``macro_f1`` ``(heads,)``; from a confusion grid also
    ``per_class_f1`` ``(heads, classes)`` and the matrices ``(heads, true, predicted)``."""

    acc: torch.Tensor
    macro_f1: torch.Tensor
    per_class_f1: torch.Tensor | None = None
    confusion: torch.Tensor | None = None


def grid_scores(matrix: torch.Tensor) -> GridScores:
    """The scores of confusion matrices ``(heads, true, predicted)``.

    Macro-F1 averages over the classes present in the targets or the predictions, as
    scikit-learn's ``f1_score(average="macro")`` does.
    """
    counts = matrix
    matrix = matrix.double()
    true_positives = matrix.diagonal(dim1=1, dim2=2)
    support = matrix.sum(dim=2)
    predicted = matrix.sum(dim=1)
    denominator = support + predicted
    per_class = torch.where(denominator > 0, 2 * true_positives / denominator.clamp(min=1), 0.0)
    present = denominator > 0
    macro = (per_class * present).sum(dim=1) / present.sum(dim=1).clamp(min=1)
    accuracy = true_positives.sum(dim=1) / matrix.sum(dim=(1, 2)).clamp(min=1)
    return GridScores(accuracy.float(), macro.float(), per_class.float(), counts)
