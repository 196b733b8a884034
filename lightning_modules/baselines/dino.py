"""``DINOModule``: self-distillation with lightly's DINO head, loss and momentum helpers."""

from __future__ import annotations

import copy

import torch
from lightly.loss import DINOLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.utils.scheduler import cosine_schedule
from torch import nn

from datamodules.views import (
    CIFAR_RECIPE_MAX_SIZE,
    Recipe,
    View,
    Views,
    blur_sigmas,
    colour_recipe,
    small_image_blur,
)

from .collapse import entropy_ratio
from .self_supervised import SelfSupervisedModule


def dino_view(image_size: int, channels: int, n_local_views: int = 2) -> View:
    """Two global and ``n_local_views`` local lightly DINO views (local crops half the size).
    As in lightly, the first global view is always blurred, the second rarely but sometimes
    solarized, the local views blurred half the time; crops are resized bicubically. At 32 px
    nothing is blurred (lightly's CIFAR-10 benchmark)."""
    shared = {
        "interpolation": "bicubic",
        "sigmas": blur_sigmas(image_size),
        **colour_recipe(channels, strength=0.5),
    }
    global_crop = {"size": image_size, "scale": (0.4, 1.0)}
    first = Recipe(**global_crop, blur_prob=small_image_blur(image_size, 1.0), **shared)
    second = Recipe(
        **global_crop, blur_prob=small_image_blur(image_size, 0.1), solarize_prob=0.2, **shared
    )
    local = Recipe(
        size=max(8, image_size // 2),
        scale=(0.1, 0.4),
        blur_prob=small_image_blur(image_size, 0.5),
        **shared,
    )
    return Views(((first, 1), (second, 1), (local, n_local_views)))


class DINOModule(SelfSupervisedModule):
    """DINO (Caron et al. 2021) on a timm backbone; the teacher follows the student by momentum
    and never receives gradients. The defaults are lightly's CIFAR-10 recipe (kNN accuracy 0.840
    with a ResNet-18 at 32 px), where it differs from its ImageNet one.

    Args:
        output_dim: DINO head output size (lightly's CIFAR-10 2048; ImageNet 65536).
        hidden_dim: hidden size of the head (lightly's CIFAR-10 2048).
        bottleneck_dim: bottleneck size of the head (lightly's CIFAR-10 256).
        n_local_views: local crops per image, besides the two global views. None: none at 32 px
            and below, where a half-size crop is 16 px (lightly's CIFAR-10 recipe), else 2
            (lightly's ImageNet recipe takes 6 at 96 px from 224 px images).
        teacher_temp: the teacher's softmax temperature (lightly's 0.04; solo-learn's CIFAR
            recipe 0.07). The student's is 0.1 and the centre's momentum 0.9, DINO's own.
        momentum_start: teacher momentum at the first step (lightly's CIFAR-10 0.99; ImageNet's
            0.996 left DINO's loss flat on small data).
        momentum_end: teacher momentum at the last step, reached on lightly's cosine schedule
            (lightly's CIFAR-10 keeps 0.99 throughout; DINO's ImageNet recipe rises to 1).
        warmup_teacher_temp_epochs: epochs of teacher-temperature warm-up.
        freeze_last_layer: epochs during which the head's last layer is not updated
            (solo-learn's CIFAR recipe: 1).
        lr: learning rate for a global batch of 256, scaled linearly. 4.0, chosen on validation
            at the short budgets of the demo and NDSB, since DINO learns more slowly per step
            than SimCLR (``docs/tuning/dino.md``); lightly's 0.12 is for 200 epochs.
        **shared: the settings of ``SelfSupervisedModule`` (``num_classes``, ``backbone``,
            ``lr``...).
    """

    collapse_signals = ("embedding_std_ratio", "teacher_entropy_ratio")

    def __init__(
        self,
        output_dim: int = 2048,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_local_views: int | None = None,
        teacher_temp: float = 0.04,
        momentum_start: float = 0.99,
        momentum_end: float = 0.99,
        warmup_teacher_temp_epochs: int = 5,
        freeze_last_layer: int = 1,
        lr: float = 4.0,
        **shared: object,
    ) -> None:
        super().__init__(lr=lr, **shared)
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
            output_dim=output_dim,
            teacher_temp=teacher_temp,
            warmup_teacher_temp=min(teacher_temp, 0.04),
            warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
        )

    def train_view(self, image_size: int, channels: int) -> View:
        local_views = self.hparams.n_local_views
        if local_views is None:
            local_views = 0 if image_size <= CIFAR_RECIPE_MAX_SIZE else 2
        return dino_view(image_size, channels, local_views)

    def encoders(self) -> dict[str, nn.Module]:
        """The teacher first: it is the network DINO evaluates."""
        return {"teacher": self.teacher_backbone, "student": self.backbone}

    def momentum(self) -> float:
        total = max(1, self.trainer.estimated_stepping_batches)
        settings = self.hparams
        return cosine_schedule(
            self.global_step, total, settings.momentum_start, settings.momentum_end
        )

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
