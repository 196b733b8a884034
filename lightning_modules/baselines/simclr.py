"""``SimCLRModule``: contrastive pretraining with lightly's NT-Xent loss and projection head."""

from __future__ import annotations

import torch
from lightly.loss import NTXentLoss
from lightly.models.modules import SimCLRProjectionHead

from datamodules.views import Recipe, View, Views, blur_sigmas, colour_recipe, small_image_blur

from .self_supervised import SelfSupervisedModule


def simclr_view(image_size: int, channels: int) -> View:
    """Two lightly SimCLR views, without blur at 32 px (as lightly's CIFAR-10 benchmark); crops
    are milder than lightly's 8% of the area, since small plankton images lose their class when
    cropped that far."""
    recipe = Recipe(
        size=image_size,
        scale=(0.3, 1.0),
        blur_prob=small_image_blur(image_size, 0.3),
        sigmas=blur_sigmas(image_size),
        **colour_recipe(channels, strength=1.0),
    )
    return Views(((recipe, 2),))


class SimCLRModule(SelfSupervisedModule):
    """SimCLR (Chen et al. 2020) on a timm backbone.

    Args:
        projection_dim: output size of the projection head.
        hidden_dim: hidden size of the projection head.
        temperature: NT-Xent temperature (0.5: lightly's default and the SimCLR paper's for
            CIFAR-10; 0.1 suits ImageNet-size batches).
        **shared: the settings of ``SelfSupervisedModule`` (``num_classes``, ``backbone``,
            ``lr``...).
    """

    def __init__(
        self,
        projection_dim: int = 128,
        hidden_dim: int = 512,
        temperature: float = 0.5,
        **shared: object,
    ) -> None:
        super().__init__(**shared)
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
