"""Noise that belongs to an image, not to the batch it lands in.

Features and validation losses of a noised image must not change when the batch composition, the
batch size or the number of DataLoader workers changes. The noise of image ``index`` at timestep
``t`` (and draw ``d``) is therefore drawn from its own generator, seeded from those numbers only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def _seed(*numbers: int) -> int:
    digest = hashlib.blake2b(repr(numbers).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # a non-negative 63-bit seed


def per_image_noise(
    indices: torch.Tensor | Sequence[int],
    timestep: int,
    seed: int,
    shape: Sequence[int],
    draw: int = 0,
) -> torch.Tensor:
    """Standard normal noise ``(len(indices), *shape)`` on the CPU, one generator per image."""
    indices = torch.as_tensor(indices).tolist()
    noise = torch.empty((len(indices), *shape))
    generator = torch.Generator()
    for row, index in enumerate(indices):
        generator.manual_seed(_seed(seed, index, timestep, draw))
        noise[row] = torch.randn(tuple(shape), generator=generator)
    return noise
