"""The timm backbone the ResNet baselines share, so supervised, SimCLR and DINO differ only in
how they are trained."""

from __future__ import annotations

import timm
import torch
from torch import nn

# The largest image side at which ``small_input_stem: null`` picks the small stem: at 64 px the
# ImageNet stem leaves a 2x2 map before the last stage, at 32 px 1x1 (lightly's and solo-learn's
# CIFAR recipes use the small stem at 32 px; their ImageNet-100 ones keep the ImageNet stem).
SMALL_STEM_MAX_SIZE = 64


def create_backbone(
    name: str,
    in_chans: int,
    num_classes: int = 0,
    small_input_stem: bool | None = None,
    image_size: int | None = None,
    backbone_args: dict | None = None,
) -> nn.Module:
    """A timm model, never pretrained (nothing is downloaded); ``num_classes=0`` returns pooled
    features. ``backbone_args`` go to ``timm.create_model`` as they are, for example
    ``{"layers": [1, 1, 1, 1], "channels": [32, 64, 128, 256]}`` for a ResNet-18
    with one block per stage at half width (the demo's backbone).

    ``small_input_stem`` swaps a ResNet's 7x7 stride-2 convolution and max-pool for one 3x3
    stride-1 convolution (the CIFAR variant): the ImageNet stem shrinks a 32 px image to 1x1
    before the last stage. It costs about 16x the compute at a given image size. ``None`` picks
    it for a ResNet-style model at ``image_size`` up to ``SMALL_STEM_MAX_SIZE``, and leaves any
    other model as timm builds it.
    """
    try:
        model = timm.create_model(
            name,
            pretrained=False,
            num_classes=num_classes,
            in_chans=in_chans,
            **(backbone_args or {}),
        )
    except TypeError as error:
        raise ValueError(
            f"backbone_args {backbone_args} do not fit timm's {name!r}: {error}"
        ) from None
    resnet_style = isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(
        model, "maxpool"
    )
    if small_input_stem is None:
        small_input_stem = (
            resnet_style and image_size is not None and image_size <= SMALL_STEM_MAX_SIZE
        )
    if small_input_stem:
        if not resnet_style:
            raise ValueError(
                f"small_input_stem needs a ResNet-style backbone with conv1 and maxpool; "
                f"{name!r} has neither: set small_input_stem: false (or null)"
            )
        model.conv1 = nn.Conv2d(in_chans, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


class PooledFeatures(nn.Module):
    """A timm model as an encoder: its pooled features ``(B, num_features)``, before the
    classifier if it has one."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_features = model.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)
