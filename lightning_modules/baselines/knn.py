"""A weighted k-nearest-neighbour classifier as a torchmetrics ``Metric``, the usual monitor of
self-supervised pretraining (Wu et al. 2018): cosine similarity between normalised features, votes
weighted by ``exp(similarity / temperature)``. Features are gathered from every process, so the
score does not depend on how many GPUs ran."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class KNNAccuracy(Metric):
    """Accuracy of a kNN classifier whose bank is the ``train_*`` features added this epoch."""

    full_state_update = False

    def __init__(self, num_classes: int, k: int = 20, temperature: float = 0.07) -> None:
        super().__init__()
        self.num_classes, self.k, self.temperature = num_classes, k, temperature
        for name in ("train_features", "train_labels", "test_features", "test_labels"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        train_features: torch.Tensor | None = None,
        train_labels: torch.Tensor | None = None,
        test_features: torch.Tensor | None = None,
        test_labels: torch.Tensor | None = None,
    ) -> None:
        if train_features is not None:
            self.train_features.append(F.normalize(train_features.detach().float(), dim=1))
            self.train_labels.append(train_labels.detach())
        if test_features is not None:
            self.test_features.append(F.normalize(test_features.detach().float(), dim=1))
            self.test_labels.append(test_labels.detach())

    def has_bank(self) -> bool:
        """Whether training features were added since the last reset."""
        return len(self.train_features) > 0  # a list of batches, or one tensor once synced

    def compute(self) -> torch.Tensor:
        if not self.has_bank() or len(self.test_features) == 0:
            raise RuntimeError("KNNAccuracy needs train_* and test_* features before compute()")
        bank, bank_labels = dim_zero_cat(self.train_features), dim_zero_cat(self.train_labels)
        queries, labels = dim_zero_cat(self.test_features), dim_zero_cat(self.test_labels)
        similarity, neighbours = (queries @ bank.T).topk(min(self.k, len(bank)), dim=1)
        votes = torch.zeros(len(queries), self.num_classes, device=queries.device)
        votes.scatter_add_(1, bank_labels[neighbours], (similarity / self.temperature).exp())
        return (votes.argmax(1) == labels).float().mean()
