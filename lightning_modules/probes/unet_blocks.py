"""Reading a U-Net's blocks: naming them, running the U-Net only as far as the deepest one asked
for, and pooling their feature maps."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion.unet import UNet

Pooling = Literal["avg", "avg_std", "adaptive", "tokens"]


class _StopForward(Exception):
    """Raised by the hook of the deepest requested block: nothing after it is needed."""


def resolve_layers(unet: UNet, layers: Sequence[str | int]) -> list[str]:
    """Block names from names, glob patterns (``dec.*``) or resolutions (``16``), in forward
    order. Raises ``ValueError`` listing the valid names when something matches nothing."""
    names = unet.block_names
    chosen: list[str] = []
    for item in layers:
        text = str(item)
        if text.isdigit():
            matches = [n for n in names if unet.info[n].resolution == int(text)]
        else:
            matches = fnmatch.filter(names, text)
        if not matches:
            resolutions = sorted({info.resolution for info in unet.info.values()})
            raise ValueError(
                f"layer {item!r} matches no U-Net block. Valid names: {', '.join(names)}; "
                f"patterns such as 'dec.*'; or a resolution among {resolutions}"
            )
        chosen += [m for m in matches if m not in chosen]
    return sorted(chosen, key=names.index)


def pool(h: torch.Tensor, pooling: Pooling, pool_size: int = 2) -> torch.Tensor:
    """``(B, C, H, W)`` feature maps to ``(B, features)``."""
    if pooling == "avg":
        return h.mean(dim=(2, 3))
    if pooling == "avg_std":
        return torch.cat([h.mean(dim=(2, 3)), h.std(dim=(2, 3), correction=0)], dim=1)
    if pooling == "adaptive":
        return F.adaptive_avg_pool2d(h, pool_size).flatten(1)
    if pooling == "tokens":  # every position's channels, position after position
        return h.flatten(2).transpose(1, 2).flatten(1)
    raise ValueError(f"pooling must be 'avg', 'avg_std', 'adaptive' or 'tokens', got {pooling!r}")


def capture(
    unet: UNet, x: torch.Tensor, timesteps: torch.Tensor, layers: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Outputs of the named blocks, running the U-Net only up to the deepest of them."""
    outputs: dict[str, torch.Tensor] = {}
    deepest = max(layers, key=unet.block_names.index)

    def hook(name: str):  # noqa: ANN202 - a forward-hook factory
        def store(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
            outputs[name] = output
            if name == deepest:
                raise _StopForward

        return store

    handles = [unet.block(name).register_forward_hook(hook(name)) for name in layers]
    try:
        unet(x, timesteps)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return outputs
