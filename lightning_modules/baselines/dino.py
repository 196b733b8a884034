"""``DINOModule``: self-distillation with lightly's DINO head, loss and momentum helpers."""

from __future__ import annotations

import copy

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from datamodules.views import Recipe, View, Views, blur_sigmas, colour_recipe

from .collapse import entropy_ratio
from .self_supervised import SelfSupervisedModule


def dino_view(image_size: int, channels: int, n_local_views: int = 2) -> View:
    """Two global and ``n_local_views`` local lightly DINO views (local crops half the size).
    As in lightly, the first global view is always blurred, the second rarely but sometimes
    solarized, the local views blurred half the time; crops are resized bicubically."""
    shared = {
        "interpolation": "bicubic",
        "sigmas": blur_sigmas(image_size),
        **colour_recipe(channels, strength=0.5),
    }
    global_crop = {"size": image_size, "scale": (0.4, 1.0)}
    first = Recipe(**global_crop, blur_prob=1.0, **shared)
    second = Recipe(**global_crop, blur_prob=0.1, solarize_prob=0.2, **shared)
    local = Recipe(size=max(8, image_size // 2), scale=(0.1, 0.4), blur_prob=0.5, **shared)
    return Views(((first, 1), (second, 1), (local, n_local_views)))


class DINOModule(SelfSupervisedModule):
    """DINO (Caron et al. 2021) on a timm backbone; the teacher follows the student by momentum
    on a cosine schedule and never receives gradients.

    Args:
        output_dim: DINO head output size (small defaults suit small images and CPUs).
        hidden_dim: hidden size of the head.
        bottleneck_dim: bottleneck size of the head.
        n_local_views: local crops per image, besides the two global views.
        momentum_start: teacher momentum at the first step, rising to 1 by a cosine schedule
            (lower than ImageNet's 0.996: on small data DINO's loss stays flat otherwise).
        warmup_teacher_temp_epochs: epochs of teacher-temperature warm-up.
        freeze_last_layer: epochs during which the head's last layer is not updated.
        **shared: the settings of ``SelfSupervisedModule`` (``num_classes``, ``backbone``,
            ``lr``...).
    """

    collapse_signals = ("embedding_std_ratio", "teacher_entropy_ratio")

    def __init__(
        self,
        output_dim: int = 2048,
        hidden_dim: int = 512,
        bottleneck_dim: int = 128,
        n_local_views: int = 2,
        momentum_start: float = 0.99,
        warmup_teacher_temp_epochs: int = 5,
        freeze_last_layer: int = 1,
        **shared: object,
    ) -> None:
        super().__init__(**shared)
        dim = self.backbone.num_features
        self.student_head = DINOProjectionHead(
            dim,
            hidden_dim,
            bottleneck_dim,
            output_dim,
            batch_norm=True,
            freeze_last_layer=freeze_last_layer,
        )
        self.teacher_backbone = copy.deepcopy(self.backbone)
        # Built, not deep-copied: the head's weight norm cannot be deep-copied after a forward.
        self.teacher_head = DINOProjectionHead(
            dim, hidden_dim, bottleneck_dim, output_dim, batch_norm=True
        )
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)
        self.criterion = DINOLoss(
            output_dim=output_dim, warmup_teacher_temp_epochs=warmup_teacher_temp_epochs
        )

    def train_view(self, image_size: int, channels: int) -> View:
        return dino_view(image_size, channels, self.hparams.n_local_views)

    def encoders(self) -> dict[str, nn.Module]:
        """The teacher first: it is the network DINO evaluates."""
        return {"teacher": self.teacher_backbone, "student": self.backbone}

    def momentum(self) -> float:
        total = max(1, self.trainer.estimated_stepping_batches)
        return cosine_schedule(self.global_step, total, self.hparams.momentum_start, 1.0)

    def on_train_batch_start(self, batch: object, batch_idx: int) -> None:
        momentum = self.momentum()
        update_momentum(self.backbone, self.teacher_backbone, m=momentum)
        update_momentum(self.student_head, self.teacher_head, m=momentum)

    def ssl_step(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            teacher_features = [self.teacher_backbone(v) for v in views[:2]]
        features = [self.backbone(v) for v in views[:2]]
        # Local crops, the heads and the loss in float32: under bf16-mixed, the local crops
        # (1x1 maps in the last stages) gave NaN gradients within a few dozen steps.
        with torch.autocast(self.device.type, enabled=False):
            features += [self.backbone(v.float()) for v in views[2:]]
            with torch.no_grad():
                teacher = [self.teacher_head(f.float()) for f in teacher_features]
                self.collapse.update("teacher_entropy_ratio", self.teacher_entropy(teacher))
            student = [self.student_head(f.float()) for f in features]
            loss = self.criterion(teacher, student, epoch=self.current_epoch)
        return loss, features[0]

    def teacher_entropy(self, teacher: list[torch.Tensor]) -> torch.Tensor:
        """The entropy ratio of the teacher's distributions as the loss sees them (centred, at
        this epoch's temperature), before the loss moves the centre."""
        criterion, epoch = self.criterion, self.current_epoch
        warming = epoch < criterion.warmup_teacher_temp_epochs
        temperature = criterion.teacher_temp_schedule[epoch] if warming else criterion.teacher_temp
        centred = (torch.stack(teacher) - criterion.center) / temperature
        return entropy_ratio(centred.softmax(dim=-1))

    def on_after_backward(self) -> None:
        self.student_head.cancel_last_layer_gradients(current_epoch=self.current_epoch)
