"""``SimCLRModule``: contrastive pretraining with lightly's NT-Xent loss and projection head."""

from __future__ import annotations

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead

from datamodules.views import View, simclr_view

from .self_supervised import SelfSupervisedModule


class SimCLRModule(SelfSupervisedModule):
    """SimCLR (Chen et al. 2020) on a timm backbone.

    Args:
        projection_dim: output size of the projection head.
        hidden_dim: hidden size of the projection head.
        temperature: NT-Xent temperature.
        **kwargs: the shared settings of ``SelfSupervisedModule``.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: list[str] | None = None,
        in_chans: int = 1,
        image_size: int = 32,
        backbone: str = "resnet18",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        warmup_epochs: int = 1,
        knn_k: int = 20,
        small_input_stem: bool = False,
        projection_dim: int = 128,
        hidden_dim: int = 512,
        temperature: float = 0.2,
    ) -> None:
        super().__init__(
            num_classes, class_names, in_chans, image_size, backbone, lr, weight_decay,
            warmup_epochs, knn_k, small_input_stem,
        )  # fmt: skip
        self.save_hyperparameters()
        self.projection_head = SimCLRProjectionHead(
            self.backbone.num_features, hidden_dim, projection_dim
        )
        # Negatives from every GPU: the loss under DDP equals the loss of the global batch.
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=True)

    def train_view(self, image_size: int, channels: int) -> View:
        return simclr_view(image_size, channels)

    def ssl_step(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        first, second = self.backbone(views[0]), self.backbone(views[1])
        loss = self.criterion(self.projection_head(first), self.projection_head(second))
        return loss, first
