"""Data and features whose answer is known, for probe tests (imported by pytest and by the DDP
script that pytest launches)."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lightning_modules import FeatureSource

CLASSES = 4


def write_planted_images(root: Path, per_class: int = 100) -> Path:
    """8x8 images where class c lights pixel (0, c) over a noisy background."""
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = rng.integers(0, 40, (8, 8)).astype(np.uint8)
            image[0, c] = 230
            Image.fromarray(image).save(root / f"class{c}" / f"{i:03d}.png")
    return root


class PlantedFeatures(FeatureSource):
    """Two keys: the pixels (class c lights pixel c: linearly separable by construction) and
    noise drawn from the image index (unrelated to the class)."""

    def __init__(self, noise_dim: int = 16) -> None:
        super().__init__()
        self.noise_dim = noise_dim
        self.keys = [("pixels", 0), ("noise", 0)]
        self.register_buffer("scale", torch.ones(1))
        self.calls = 0

    def feature_dims(self):
        return {("pixels", 0): 64, ("noise", 0): self.noise_dim}

    def settings(self):
        return {"planted": self.noise_dim}

    def forward(self, images, indices):
        self.calls += 1
        noise = torch.stack(
            [
                torch.randn(self.noise_dim, generator=torch.Generator().manual_seed(int(i)))
                for i in indices
            ]
        )
        return {("pixels", 0): images.flatten(1) * self.scale, ("noise", 0): noise}


class PlantedTokens(FeatureSource):
    """One key of 16 tokens x 5 channels, as ``DiffusionFeatures`` with ``pooling: tokens`` gives
    them: 15 noise tokens and, at a position drawn from the image index, one token marked by its
    first channel that holds the class (read from the planted pixel) in the others. The average
    of the tokens drowns the class in the noise; attending to the marked token finds it.
    ``averaged`` hands the probe that average instead (5 features)."""

    TOKENS, CHANNELS = 16, 1 + CLASSES

    def __init__(self, averaged: bool = False) -> None:
        super().__init__()
        self.averaged = averaged
        self.keys = [("tokens", 0)]
        self.register_buffer("scale", torch.ones(1))

    def feature_dims(self):
        return {("tokens", 0): self.CHANNELS * (1 if self.averaged else self.TOKENS)}

    def token_channels(self):
        return {("tokens", 0): self.CHANNELS}

    def settings(self):
        return {"planted_tokens": self.averaged}

    def forward(self, images, indices):
        rows = []
        for image, index in zip(images, indices.tolist(), strict=True):
            generator = torch.Generator().manual_seed(int(index))
            tokens = torch.randn(self.TOKENS, self.CHANNELS, generator=generator) * 3
            tokens[:, 0] = 0
            marked = int(torch.randint(self.TOKENS, (1,), generator=generator))
            tokens[marked] = 0
            tokens[marked, 0] = 5
            tokens[marked, 1 + int(image[0, 0, :CLASSES].argmax())] = 3
            rows.append(tokens.mean(0) if self.averaged else tokens.flatten())
        return {("tokens", 0): torch.stack(rows)}
