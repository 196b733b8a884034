"""Per-method views of the cached uint8 images ``(C, S, S)``.

Every view returns float tensors scaled to [-1, 1] (the diffusion model's range), so features of
all methods see the same pixel scale. Plankton have no canonical orientation: the training views
flip and rotate by multiples of 90 degrees, which keeps every pixel (no interpolation). SimCLR and
DINO use lightly's transforms, with colour jitter reduced to brightness and contrast for greyscale.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from lightly.transforms import DINOTransform, SimCLRTransform
from torchvision.transforms import v2
from torchvision.transforms.functional import to_pil_image

View = Callable[[torch.Tensor], torch.Tensor | list[torch.Tensor]]


class RandomRot90(torch.nn.Module):
    """Rotate by 0, 90, 180 or 270 degrees, chosen uniformly."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.rot90(image, int(torch.randint(4, ())), dims=(-2, -1))


def _to_model_range(channels: int) -> list[v2.Transform]:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * channels, [0.5] * channels)]


def _normalize(channels: int) -> dict[str, list[float]]:
    return {"mean": [0.5] * channels, "std": [0.5] * channels}


def eval_view(image_size: int, channels: int) -> View:
    """Deterministic: the cached pixels, scaled."""
    return v2.Compose(_to_model_range(channels))


def diffusion_view(image_size: int, channels: int) -> View:
    """Flips and 90-degree rotations only: the denoiser must learn the true image distribution."""
    return v2.Compose([v2.RandomHorizontalFlip(), RandomRot90(), *_to_model_range(channels)])


def supervised_view(image_size: int, channels: int) -> View:
    """Standard augmentation for a classifier trained from scratch on small images."""
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, scale=(0.6, 1.0), ratio=(0.8, 1.25), antialias=True),
            v2.RandomHorizontalFlip(),
            RandomRot90(),
            v2.ColorJitter(brightness=0.2, contrast=0.2),
            *_to_model_range(channels),
        ]
    )


class _OnPIL:
    """lightly's transforms expect PIL images; the cache holds tensors."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, image: torch.Tensor) -> list[torch.Tensor]:
        return self.transform(to_pil_image(image))


def _colour_settings(channels: int) -> dict:
    grey = channels == 1
    return {
        "cj_sat": 0.0 if grey else 0.4,
        "cj_hue": 0.0 if grey else 0.1,
        "random_gray_scale": 0.0 if grey else 0.2,
        "vf_prob": 0.5,
        "hf_prob": 0.5,
        "rr_prob": 0.5,
        "normalize": _normalize(channels),
    }


def simclr_view(image_size: int, channels: int) -> View:
    """Two lightly SimCLR views; crops are milder than ImageNet's, since small plankton images
    lose their class when cropped to 8% of their area."""
    return _OnPIL(
        SimCLRTransform(
            input_size=image_size,
            min_scale=0.3,
            gaussian_blur=0.3,
            sigmas=(0.1, max(0.2, image_size / 64)),
            **_colour_settings(channels),
        )
    )


def dino_view(image_size: int, channels: int, n_local_views: int = 2) -> View:
    """Two global and ``n_local_views`` local lightly DINO views (local crops half the size)."""
    return _OnPIL(
        DINOTransform(
            global_crop_size=image_size,
            global_crop_scale=(0.4, 1.0),
            local_crop_size=max(8, image_size // 2),
            local_crop_scale=(0.1, 0.4),
            n_local_views=n_local_views,
            sigmas=(0.1, max(0.2, image_size / 64)),
            **_colour_settings(channels),
        )
    )
