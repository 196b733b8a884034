"""Frozen features for probes: pooled U-Net activations at (layer, timestep) keys, and the
embedding of a baseline encoder under a single key.

One U-Net forward per timestep yields every requested layer (``unet_blocks.capture``), and the
forward stops after the deepest block asked for, so probing encoder layers does not pay for the
decoder. The noise of every image comes from ``per_image_noise``: the same image gives
bit-identical features whatever batch it lands in.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

import torch
from torch import nn

from ..common.module import load_checkpoint
from ..diffusion.module import load_diffusion
from ..diffusion.noise_schedule import NoiseSchedule
from ..diffusion.per_image_noise import per_image_noise
from ..diffusion.unet import UNet
from ..registry import BASELINES, METHODS, method_of
from .unet_blocks import Pooling, capture, pool, resolve_layers

# (layer, timestep); encoders without timesteps use (name, None).
FeatureKey = tuple[str, int | None]


def latest_checkpoint(pattern: str) -> str:
    """``pattern`` itself, or the most recently written file matching it as a glob."""
    if not any(ch in pattern for ch in "*?["):
        return pattern
    matches = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not matches:
        raise FileNotFoundError(
            f"no checkpoint matches {pattern}: train the model first "
            "(plankton fit --config configs/diffusion.yaml) or give the checkpoint's path"
        )
    return matches[-1]


class FeatureSource(nn.Module):
    """Frozen features of images at one or several keys, for probes and clustering:
    ``forward(images, indices)`` returns ``{key: (batch, features)}``.

    A subclass sets ``keys`` and ``micro_batch`` and implements ``feature_dims``, ``settings`` and
    ``micro_batch_features``; ``fingerprint`` then names its features in the on-disk feature
    cache. The backbone always runs on exactly ``micro_batch`` images (the last group padded with
    copies): kernels pick their arithmetic by batch size, and a fixed size keeps an image's
    features bit-identical whatever batch it arrives in.
    """

    keys: list[FeatureKey]
    micro_batch: int
    # The constructor arguments that rebuild this source from its checkpoint (plain values, the
    # glob resolved), stored in probe checkpoints; None for a source built from objects in memory.
    init_args: dict | None = None

    def feature_dims(self) -> dict[FeatureKey, int]:
        raise NotImplementedError

    def bind_data(self, in_chans: int, image_size: int) -> None:
        """Told the data's image shape before ``feature_dims`` is asked (sources whose size
        depends on it)."""

    def settings(self) -> dict:
        """Everything besides the weights that decides the features."""
        raise NotImplementedError

    def micro_batch_features(
        self, images: torch.Tensor, indices: torch.Tensor
    ) -> dict[FeatureKey, torch.Tensor]:
        """Features of exactly ``micro_batch`` images."""
        raise NotImplementedError

    @torch.no_grad()
    def forward(
        self, images: torch.Tensor, indices: torch.Tensor | Sequence[int]
    ) -> dict[FeatureKey, torch.Tensor]:
        indices = torch.as_tensor(indices)
        parts = []
        for start in range(0, len(images), self.micro_batch):
            group = images[start : start + self.micro_batch]
            group_indices = indices[start : start + self.micro_batch]
            count, padding = len(group), self.micro_batch - len(group)
            group = torch.cat([group, group[:1].expand(padding, *group.shape[1:])])
            group_indices = torch.cat([group_indices, group_indices[:1].expand(padding)])
            features = self.micro_batch_features(group, group_indices)
            parts.append({key: value[:count] for key, value in features.items()})
        return {key: torch.cat([part[key] for part in parts]) for key in self.keys}

    def fingerprint(self) -> str:
        """A hash of the weights and the settings: equal fingerprints give equal features."""
        digest = hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:24]

    def train(self, mode: bool = True) -> FeatureSource:
        """The backbone stays in eval mode (dropout, batch norm) whatever the caller asks."""
        return super().train(False)


# On the fields that change how the features are computed, not what they are: kept out of the
# fingerprint, so that a cache written with one value serves the other.
_NOT_FINGERPRINTED = {"fingerprinted": False}


@dataclass(frozen=True)
class DiffusionSettings:
    """The settings of U-Net features besides the checkpoint and weights, described in
    ``DiffusionFeatures``: checked once, and the one place that gives the checkpoint's
    ``init_args`` and the fingerprinted ``settings()``."""

    layers: tuple[str | int, ...] = ("*",)
    timesteps: tuple[int, ...] = (1, 2, 3, 5, 8, 11, 16, 25, 50, 100, 200)
    pooling: Pooling = "avg"
    pool_size: int = 2
    noise_draws: int = 1
    seed: int = 0
    stack_timesteps: bool = field(default=False, metadata=_NOT_FINGERPRINTED)
    concat_timesteps: bool = False
    micro_batch: int = field(default=16, metadata=_NOT_FINGERPRINTED)

    def __post_init__(self) -> None:
        # Tuples of plain values, whatever sequences were given (assigned past the frozen guard).
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
        if self.noise_draws < 1:
            raise ValueError(f"noise_draws must be at least 1, got {self.noise_draws}")
        pool(torch.zeros(1, 1, 1, 1), self.pooling, self.pool_size)  # rejects an unknown pooling

    def init_args(self, checkpoint: str, weights: str) -> dict:
        """The arguments of ``DiffusionFeatures`` that rebuild it, as plain values."""
        return {"checkpoint": checkpoint, **self._plain(), "weights": weights}

    def feature_settings(self, layers: list[str], schedule: NoiseSchedule) -> dict:
        """``FeatureSource.settings``: the fingerprinted fields, with the layers as resolved on
        the U-Net, and its noise schedule."""
        plain = self._plain()
        kept = {f.name: plain[f.name] for f in fields(self) if f.metadata.get("fingerprinted", 1)}
        return {
            "source": "diffusion",
            **kept,
            "layers": layers,
            "schedule": [schedule.kind, schedule.timesteps],
        }

    def _plain(self) -> dict:
        """Every field in order, tuples as lists."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: list(v) if isinstance(v, tuple) else v for name, v in values.items()}


class UNetFeatures(FeatureSource):
    """A feature source over a frozen U-Net in memory: ``forward(images, indices)`` returns
    ``{(layer, timestep): (batch, features)}``. ``DiffusionFeatures`` builds one from a
    checkpoint and describes the settings."""

    def __init__(
        self, unet: UNet, schedule: NoiseSchedule, config: DiffusionSettings | None = None
    ) -> None:
        super().__init__()
        self.config = config = config or DiffusionSettings()
        schedule.check(list(config.timesteps))
        self.unet = unet.eval().requires_grad_(False)
        self.schedule = schedule
        self.layers = resolve_layers(unet, config.layers)
        self.micro_batch = config.micro_batch
        self.keys = (
            [(layer, None) for layer in self.layers]
            if config.concat_timesteps
            else [(layer, t) for t in config.timesteps for layer in self.layers]
        )

    def settings(self) -> dict:
        return self.config.feature_settings(self.layers, self.schedule)

    def feature_dims(self) -> dict[FeatureKey, int]:
        config = self.config

        def per_channel(layer: str) -> int:
            if config.pooling == "tokens":  # one value per position
                return self.unet.info[layer].resolution ** 2
            return {"avg": 1, "avg_std": 2, "adaptive": config.pool_size**2}[config.pooling]

        times = len(config.timesteps) if config.concat_timesteps else 1
        return {
            (layer, t): self.unet.info[layer].channels * per_channel(layer) * times
            for layer, t in self.keys
        }

    def token_channels(self) -> dict[FeatureKey, int]:
        """The channels of each key's tokens (its features are positions x channels), for an
        attention-pooling head."""
        if self.config.pooling != "tokens" or self.config.concat_timesteps:
            raise ValueError(
                "an attention-pooling head reads a layer's spatial tokens: set the features' "
                "pooling: tokens (and concat_timesteps: false)"
            )
        return {(layer, t): self.unet.info[layer].channels for layer, t in self.keys}

    def micro_batch_features(
        self, images: torch.Tensor, indices: torch.Tensor
    ) -> dict[FeatureKey, torch.Tensor]:
        config, timesteps = self.config, list(self.config.timesteps)
        sums: dict[FeatureKey, torch.Tensor] = {}
        for draw in range(config.noise_draws):
            noised, steps = [], []
            for t in timesteps:
                noise = per_image_noise(indices, t, config.seed, images.shape[1:], draw).to(images)
                t_batch = torch.full((len(images),), t, device=images.device, dtype=torch.long)
                noised.append(self.schedule.q_sample(images, t_batch, noise))
                steps.append(t_batch)
            groups = (
                [(torch.cat(noised), torch.cat(steps), timesteps)]
                if config.stack_timesteps
                else [(x, s, [t]) for x, s, t in zip(noised, steps, timesteps, strict=True)]
            )
            for x, s, group_timesteps in groups:
                for layer, h in capture(self.unet, x, s, self.layers).items():
                    pooled = pool(h.float(), config.pooling, config.pool_size)
                    for chunk, t in zip(pooled.split(len(images)), group_timesteps, strict=True):
                        key = (layer, t)
                        sums[key] = sums[key] + chunk if key in sums else chunk
        if config.concat_timesteps:
            sums = {
                (layer, None): torch.cat([sums[(layer, t)] for t in timesteps], dim=1)
                for layer in self.layers
            }
        return {key: sums[key] / config.noise_draws for key in self.keys}


class DiffusionFeatures(UNetFeatures):
    """A feature source over the frozen U-Net of a diffusion checkpoint.

    ``forward(images, indices)`` returns ``{(layer, timestep): (batch, features)}``.

    Args:
        checkpoint: a DiffusionModule checkpoint (read with ``weights_only=True``), or a glob
            pattern such as ``runs/diffusion/version_*/checkpoints/last.ckpt`` for the newest.
        layers: block names, patterns (``dec.*``) or resolutions (``16``).
        timesteps: noise levels, each in [0, T).
        pooling: ``avg`` (global average), ``avg_std`` (average and standard deviation),
            ``adaptive`` (``pool_size`` x ``pool_size`` average, flattened) or ``tokens`` (no
            pooling: every position's channels, for a probe's attention-pooling head).
        pool_size: side of the adaptive pooling grid.
        noise_draws: average the features over this many noise samples.
        seed: seed of the per-image noise.
        stack_timesteps: run all timesteps as one batch (faster on GPUs, more memory). Results
            equal the unstacked ones up to float rounding, not bit for bit.
        concat_timesteps: one key per layer, ``(layer, None)``, whose features are those of
            every timestep side by side (a readout across noise levels) instead of one key per
            (layer, timestep).
        micro_batch: the U-Net always runs on exactly this many images (see ``FeatureSource``).
        weights: ``ema`` (default) or ``raw`` training weights.
    """

    # The parameters are spelled out, not taken from DiffusionSettings: they are the YAML and CLI
    # interface, which the CLI reads from this signature (a test keeps the two in step).
    def __init__(
        self,
        checkpoint: str,
        layers: Sequence[str | int] = ("*",),
        timesteps: Sequence[int] = (1, 2, 3, 5, 8, 11, 16, 25, 50, 100, 200),
        pooling: Pooling = "avg",
        pool_size: int = 2,
        noise_draws: int = 1,
        seed: int = 0,
        stack_timesteps: bool = False,
        concat_timesteps: bool = False,
        micro_batch: int = 16,
        weights: Literal["ema", "raw"] = "ema",
    ) -> None:
        path = latest_checkpoint(checkpoint)
        module = load_diffusion(path)
        config = DiffusionSettings(
            layers, timesteps, pooling, pool_size, noise_draws, seed,
            stack_timesteps, concat_timesteps, micro_batch,
        )  # fmt: skip
        super().__init__(module.ema if weights == "ema" else module.unet, module.schedule, config)
        self.init_args = config.init_args(os.path.abspath(path), weights)

    @staticmethod
    def from_unet(unet: UNet, schedule: NoiseSchedule, **settings: object) -> UNetFeatures:
        """A feature source over a U-Net in memory; ``settings`` and their defaults are those of
        ``__init__`` (without ``checkpoint`` and ``weights``)."""
        return UNetFeatures(unet, schedule, DiffusionSettings(**settings))


class EncoderFeatures(FeatureSource):
    """The pooled embedding of a frozen encoder, read from the checkpoint of any registered
    baseline (``lightning_modules.METHODS``), as a feature source with one key,
    ``("embedding", None)``, so the baselines go through the same ProbeModule as the diffusion
    features.

    Args:
        checkpoint: a checkpoint path, or a glob pattern for the newest match; read with
            ``weights_only=True``.
        micro_batch: the encoder always runs on exactly this many images.
        weights: which network of the checkpoint (the names of the module's ``encoders()``):
            ``auto`` takes the method's first, e.g. DINO's teacher, the network DINO
            evaluates; ``student`` takes DINO's student.
    """

    KEY: FeatureKey = ("embedding", None)

    def __init__(self, checkpoint: str, micro_batch: int = 16, weights: str = "auto") -> None:
        super().__init__()
        path = latest_checkpoint(checkpoint)
        saved = load_checkpoint(path)
        method = method_of(saved["state_dict"])
        if method not in BASELINES:
            found = f"a {METHODS[method].display_name} checkpoint" if method else "not a checkpoint"
            raise ValueError(
                f"{path} is {found} of the baselines "
                f"({', '.join(METHODS[name].display_name for name in BASELINES)}); "
                "diffusion checkpoints go to DiffusionFeatures"
            )
        networks = METHODS[method].module.from_checkpoint(saved).encoders()
        network = next(iter(networks)) if weights == "auto" else weights
        if network not in networks:
            raise ValueError(
                f"weights: {weights} names no network of the {METHODS[method].display_name} "
                f"checkpoint {path}; choose auto or one of {', '.join(networks)}"
            )
        self.encoder = networks[network].eval().requires_grad_(False)
        self.method, self.network = method, network
        self.micro_batch = micro_batch
        self.keys = [self.KEY]
        self.init_args = {
            "checkpoint": os.path.abspath(path),
            "micro_batch": micro_batch,
            "weights": weights,
        }

    def settings(self) -> dict:
        return {"source": "encoder", "method": self.method, "network": self.network}

    def feature_dims(self) -> dict[FeatureKey, int]:
        return {self.KEY: self.encoder.num_features}

    def micro_batch_features(
        self, images: torch.Tensor, indices: torch.Tensor
    ) -> dict[FeatureKey, torch.Tensor]:
        return {self.KEY: self.encoder(images).float()}


class PixelFeatures(FeatureSource):
    """The images themselves, flattened, under one key ``("pixels", None)``: probed like any
    other source, it is logistic regression on raw pixels, the floor that learned features must
    clear (a method below it has learned less about the classes than the pixels carry).

    Args:
        micro_batch: images per group (nothing is computed; only the grouping of the base).
    """

    KEY: FeatureKey = ("pixels", None)

    def __init__(self, micro_batch: int = 64) -> None:
        super().__init__()
        self.micro_batch = micro_batch
        self.keys = [self.KEY]
        self.init_args = {"micro_batch": micro_batch}
        self.image_shape: tuple[int, int] | None = None

    def bind_data(self, in_chans: int, image_size: int) -> None:
        self.image_shape = (in_chans, image_size)

    def settings(self) -> dict:
        return {"source": "pixels"}

    def feature_dims(self) -> dict[FeatureKey, int]:
        if self.image_shape is None:
            raise RuntimeError("PixelFeatures needs bind_data(in_chans, image_size) first")
        in_chans, image_size = self.image_shape
        return {self.KEY: in_chans * image_size**2}

    def micro_batch_features(
        self, images: torch.Tensor, indices: torch.Tensor
    ) -> dict[FeatureKey, torch.Tensor]:
        return {self.KEY: images.flatten(1).float()}
