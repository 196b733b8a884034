"""A DDPM/ADM-style U-Net whose every block has a stable name saying where it sits.

Blocks run in this order, each named ``<part>.<level>.<index>`` where ``level`` is the resolution
level (0 = full resolution), so ``enc.1.0`` and ``dec.1.0`` see the same resolution:

    stem -> enc.0.0 ... enc.0.{n} (downsample) -> enc.1.0 ... -> mid.0, mid.1 -> dec.{L-1}.0 ...
    -> dec.0.{n} -> out

Each encoder level has ``num_res_blocks`` residual blocks and, except the last level, a
downsampling block; each decoder level has ``num_res_blocks + 1`` blocks that take a skip
connection each, the last one upsampling (except at level 0). Residual blocks receive the
timestep embedding; attention is added at the resolutions listed in ``attention_resolutions``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, ``(batch, dim)``."""
    half = dim // 2
    frequencies = torch.exp(
        -math.log(10000) * torch.arange(half, device=timesteps.device, dtype=torch.float32) / half
    )
    angles = timesteps.float()[:, None] * frequencies[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(embedding, (0, dim % 2))


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, channels // 4) if channels >= 8 else 1, channels)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialised output layers: every residual branch starts as the identity."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResBlock(nn.Module):
    def __init__(self, channels: int, out_channels: int, embed_dim: int, dropout: float) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            _norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.embed = nn.Sequential(nn.SiLU(), nn.Linear(embed_dim, out_channels))
        self.out_layers = nn.Sequential(
            _norm(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip = (
            nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(
        self, x: torch.Tensor, embedding: torch.Tensor, inverse: torch.Tensor
    ) -> torch.Tensor:
        h = self.in_layers(x) + self.embed(embedding)[inverse][:, :, None, None]
        return self.skip(x) + self.out_layers(h)


# Without AMX, PyTorch's fused CPU attention kernel runs about twice as fast in float32 as in
# bfloat16 (AVX512-BF16 speeds up its convolutions, not this kernel's small matrix products).
_CPU_ATTENTION_IN_FLOAT32 = not torch.cpu._is_amx_tile_supported()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``scaled_dot_product_attention``; on a CPU without AMX, bfloat16 inputs are computed in
    float32 and the result cast back."""
    if q.dtype == torch.bfloat16 and q.device.type == "cpu" and _CPU_ATTENTION_IN_FLOAT32:
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)


class AttentionBlock(nn.Module):
    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels cannot be split into {num_heads} heads")
        self.num_heads = num_heads
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(self.norm(x).reshape(batch, channels, -1))
        q, k, v = (
            qkv.reshape(batch, 3, self.num_heads, channels // self.num_heads, -1)
            .transpose(-1, -2)
            .contiguous()  # the fused attention kernels need unit stride in the last dimension
            .unbind(1)
        )
        h = attention(q, k, v)
        h = h.transpose(-1, -2).reshape(batch, channels, -1)
        return x + self.proj(h).reshape(batch, channels, height, width)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNetBlock(nn.Module):
    """One named stage: residual and attention layers, or a resampling layer."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(
        self, x: torch.Tensor, embedding: torch.Tensor, inverse: torch.Tensor
    ) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, embedding, inverse) if isinstance(layer, ResBlock) else layer(x)
        return x


@dataclass(frozen=True)
class BlockInfo:
    name: str
    resolution: int
    channels: int


class UNet(nn.Module):
    """Epsilon-prediction U-Net.

    Args:
        in_chans: image channels (1 greyscale, 3 RGB).
        image_size: side of the input images; must be divisible by ``2 ** (levels - 1)``.
        base_channels: channels of the first level.
        channel_mult: channel multiplier of every level (its length is the number of levels).
        num_res_blocks: residual blocks per encoder level.
        attention_resolutions: feature-map sides at which self-attention is added.
        num_heads: attention heads.
        dropout: dropout inside residual blocks.
    """

    def __init__(
        self,
        in_chans: int = 1,
        image_size: int = 32,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        num_heads: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        factor = 2 ** (len(channel_mult) - 1)
        if image_size % factor:
            raise ValueError(
                f"image_size {image_size} is not divisible by {factor}, the total downsampling of "
                f"{len(channel_mult)} levels: change image_size or channel_mult"
            )
        embed_dim = 4 * base_channels
        self.base_channels = base_channels
        self.time_embed = nn.Sequential(
            nn.Linear(base_channels, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim)
        )
        self.stem = nn.Conv2d(in_chans, base_channels, 3, padding=1)
        # Nested lists make the module paths the block names: ``enc.1.0`` is self.enc[1][0].
        self.enc = nn.ModuleList(nn.ModuleList() for _ in channel_mult)
        self.mid = nn.ModuleList()
        self.dec = nn.ModuleList(nn.ModuleList() for _ in channel_mult)
        self.info: dict[str, BlockInfo] = {}

        def add(name: str, resolution: int, channels: int, *layers: nn.Module) -> None:
            part, *position = name.split(".")
            container = getattr(self, part)
            for level in position[:-1]:
                container = container[int(level)]
            container.append(UNetBlock(*layers))
            self.info[name] = BlockInfo(name, resolution, channels)

        def residual(channels: int, out: int, resolution: int) -> list[nn.Module]:
            layers: list[nn.Module] = [ResBlock(channels, out, embed_dim, dropout)]
            if resolution in attention_resolutions:
                layers.append(AttentionBlock(out, num_heads))
            return layers

        channels, resolution = base_channels, image_size
        skips = [channels]
        for level, mult in enumerate(channel_mult):
            for index in range(num_res_blocks):
                out = base_channels * mult
                add(f"enc.{level}.{index}", resolution, out, *residual(channels, out, resolution))
                channels = out
                skips.append(channels)
            if level < len(channel_mult) - 1:
                resolution //= 2
                add(f"enc.{level}.{num_res_blocks}", resolution, channels, Downsample(channels))
                skips.append(channels)
        add(
            "mid.0",
            resolution,
            channels,
            ResBlock(channels, channels, embed_dim, dropout),
            AttentionBlock(channels, num_heads),
        )
        add("mid.1", resolution, channels, ResBlock(channels, channels, embed_dim, dropout))
        for level, mult in reversed(list(enumerate(channel_mult))):
            for index in range(num_res_blocks + 1):
                out = base_channels * mult
                layers = residual(channels + skips.pop(), out, resolution)
                channels = out
                upsample = level > 0 and index == num_res_blocks
                if upsample:
                    layers.append(Upsample(channels))
                add(f"dec.{level}.{index}", resolution * (2 if upsample else 1), channels, *layers)
                resolution *= 2 if upsample else 1
        self.out = nn.Sequential(
            _norm(channels), nn.SiLU(), _zero(nn.Conv2d(channels, in_chans, 3, padding=1))
        )

    @property
    def block_names(self) -> list[str]:
        """Every block, in the order the forward pass runs them."""
        return list(self.info)

    def block(self, name: str) -> UNetBlock:
        return self.get_submodule(name)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        # Timestep embeddings are computed once per distinct timestep and gathered per image:
        # an image's result then does not depend on how many other images share its batch (the
        # matrix products of the embedding MLPs round differently for different batch sizes).
        unique, inverse = torch.unique(timesteps, return_inverse=True)
        embedding = self.time_embed(timestep_embedding(unique, self.base_channels))
        h = self.stem(x)
        skips = [h]
        for name in self.info:
            block = self.get_submodule(name)
            if name.startswith("dec."):
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, embedding, inverse)
            if name.startswith("enc."):
                skips.append(h)
        return self.out(h)
