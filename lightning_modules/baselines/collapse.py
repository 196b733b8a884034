"""Signals that a self-supervised encoder has collapsed: every image mapped to (nearly) the same
embedding, or DINO's teacher giving every image the same, uniform output.

Both are cheap statistics of what a training step computes anyway, averaged over an epoch and
synced across processes:

- ``embedding_std_ratio``: the per-dimension standard deviation of the L2-normalised embeddings,
  times sqrt(dimensions). Embeddings spread evenly over the sphere give about 1; a collapsed
  encoder gives 0 (the SimSiam paper's collapse monitor, scaled to read the same at any width).
- ``teacher_entropy_ratio`` (DINO): the mean entropy of the teacher's output distribution over
  log(output_dim). 1 is the uniform collapse, in which DINO's loss sits at log(output_dim).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

# name -> (a collapsed run lies "below" or "above" it, threshold)
COLLAPSED = {"embedding_std_ratio": ("below", 0.1), "teacher_entropy_ratio": ("above", 0.98)}


def embedding_std_ratio(features: torch.Tensor) -> torch.Tensor:
    """About 1 for embeddings spread over the sphere, 0 when they collapse to one point."""
    normalised = F.normalize(features.detach().float(), dim=1)
    return normalised.std(dim=0).mean() * math.sqrt(features.shape[1])


def entropy_ratio(probabilities: torch.Tensor) -> torch.Tensor:
    """Mean entropy of distributions ``(..., K)`` over log K: 1 for uniform outputs."""
    entropy = -(probabilities * probabilities.clamp(min=1e-12).log()).sum(-1)
    return entropy.mean() / math.log(probabilities.shape[-1])


class CollapseMonitor(nn.Module):
    """Epoch means of the collapse signals, and which of them say collapsed."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.means = nn.ModuleDict({name: MeanMetric() for name in names})
        self.last: dict[str, float] = {}

    def update(self, name: str, value: torch.Tensor) -> None:
        self.means[name].update(value.detach())

    def end_epoch(self) -> dict[str, float]:
        """The epoch's means (synced across processes); the meters start again."""
        self.last = {}
        for name, mean in self.means.items():
            if mean.update_count:
                self.last[name] = float(mean.compute())
            mean.reset()
        return self.last

    def collapsed(self) -> list[str]:
        """The signals of the last epoch on the collapsed side of their threshold, explained."""
        found = []
        for name, value in self.last.items():
            side, threshold = COLLAPSED[name]
            if (value < threshold) if side == "below" else (value > threshold):
                found.append(f"{name} {value:.3f} ({side} {threshold})")
        return found
