"""Frozen features for probes: pooled U-Net activations at (layer, timestep) keys, and the
embedding of a baseline encoder under a single key.

One U-Net forward per timestep yields every requested layer (forward hooks on the named blocks),
and the forward stops after the deepest block asked for, so probing encoder layers does not pay
for the decoder. The noise of every image comes from ``per_image_noise``: the same image gives
bit-identical features whatever batch it lands in.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import inspect
import json
import os
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..common.module import load_checkpoint
from ..diffusion.module import load_diffusion
from ..diffusion.noise_schedule import NoiseSchedule
from ..diffusion.per_image_noise import per_image_noise
from ..diffusion.unet import UNet

Pooling = Literal["avg", "avg_std", "adaptive", "tokens"]
# (layer, timestep); encoders without timesteps use (name, None).
FeatureKey = tuple[str, int | None]


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


class DiffusionFeatures(FeatureSource):
    """A feature source over a frozen U-Net: ``forward(images, indices)`` returns
    ``{(layer, timestep): (batch, features)}``.

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
        super().__init__()
        unet = module.ema if weights == "ema" else module.unet
        self._build(
            unet, module.schedule, layers, timesteps, pooling, pool_size, noise_draws, seed,
            stack_timesteps, concat_timesteps, micro_batch,
        )  # fmt: skip
        self.init_args = {
            "checkpoint": os.path.abspath(path), "layers": list(layers),
            "timesteps": [int(t) for t in timesteps], "pooling": pooling, "pool_size": pool_size,
            "noise_draws": noise_draws, "seed": seed, "stack_timesteps": stack_timesteps,
            "concat_timesteps": concat_timesteps, "micro_batch": micro_batch, "weights": weights,
        }  # fmt: skip

    @classmethod
    def from_unet(
        cls, unet: UNet, schedule: NoiseSchedule, **settings: object
    ) -> DiffusionFeatures:
        """A feature source over a U-Net in memory; ``settings`` and their defaults are those of
        ``__init__`` (without ``checkpoint`` and ``weights``)."""
        defaults = {
            name: parameter.default
            for name, parameter in inspect.signature(cls.__init__).parameters.items()
            if parameter.default is not inspect.Parameter.empty and name != "weights"
        }
        source = cls.__new__(cls)
        FeatureSource.__init__(source)
        source._build(unet, schedule, **(defaults | settings))
        return source

    def _build(
        self,
        unet: UNet,
        schedule: NoiseSchedule,
        layers: Sequence[str | int],
        timesteps: Sequence[int],
        pooling: Pooling,
        pool_size: int,
        noise_draws: int,
        seed: int,
        stack_timesteps: bool,
        concat_timesteps: bool,
        micro_batch: int,
    ) -> None:
        schedule.check(list(timesteps))
        if noise_draws < 1:
            raise ValueError(f"noise_draws must be at least 1, got {noise_draws}")
        pool(torch.zeros(1, 1, 1, 1), pooling, pool_size)  # rejects an unknown pooling now
        self.unet = unet.eval().requires_grad_(False)
        self.schedule = schedule
        self.layers = resolve_layers(unet, layers)
        self.timesteps = [int(t) for t in timesteps]
        self.pooling, self.pool_size = pooling, pool_size
        self.noise_draws, self.seed = noise_draws, seed
        self.stack_timesteps, self.concat_timesteps = stack_timesteps, concat_timesteps
        self.micro_batch = micro_batch
        self.keys = (
            [(layer, None) for layer in self.layers]
            if concat_timesteps
            else [(layer, t) for t in self.timesteps for layer in self.layers]
        )

    def settings(self) -> dict:
        return {
            "source": "diffusion",
            "layers": self.layers,
            "timesteps": self.timesteps,
            "pooling": self.pooling,
            "pool_size": self.pool_size,
            "noise_draws": self.noise_draws,
            "seed": self.seed,
            "concat_timesteps": self.concat_timesteps,
            "schedule": [self.schedule.kind, self.schedule.timesteps],
        }

    def feature_dims(self) -> dict[FeatureKey, int]:
        def per_channel(layer: str) -> int:
            if self.pooling == "tokens":  # one value per position
                return self.unet.info[layer].resolution ** 2
            return {"avg": 1, "avg_std": 2, "adaptive": self.pool_size**2}[self.pooling]

        times = len(self.timesteps) if self.concat_timesteps else 1
        return {
            (layer, t): self.unet.info[layer].channels * per_channel(layer) * times
            for layer, t in self.keys
        }

    def token_channels(self) -> dict[FeatureKey, int]:
        """The channels of each key's tokens (its features are positions x channels), for an
        attention-pooling head."""
        if self.pooling != "tokens" or self.concat_timesteps:
            raise ValueError(
                "an attention-pooling head reads a layer's spatial tokens: set the features' "
                "pooling: tokens (and concat_timesteps: false)"
            )
        return {(layer, t): self.unet.info[layer].channels for layer, t in self.keys}

    def micro_batch_features(
        self, images: torch.Tensor, indices: torch.Tensor
    ) -> dict[FeatureKey, torch.Tensor]:
        sums: dict[FeatureKey, torch.Tensor] = {}
        for draw in range(self.noise_draws):
            noised, steps = [], []
            for t in self.timesteps:
                noise = per_image_noise(indices, t, self.seed, images.shape[1:], draw).to(images)
                t_batch = torch.full((len(images),), t, device=images.device, dtype=torch.long)
                noised.append(self.schedule.q_sample(images, t_batch, noise))
                steps.append(t_batch)
            groups = (
                [(torch.cat(noised), torch.cat(steps), self.timesteps)]
                if self.stack_timesteps
                else [(x, s, [t]) for x, s, t in zip(noised, steps, self.timesteps, strict=True)]
            )
            for x, s, group_timesteps in groups:
                for layer, h in capture(self.unet, x, s, self.layers).items():
                    pooled = pool(h.float(), self.pooling, self.pool_size)
                    for chunk, t in zip(pooled.split(len(images)), group_timesteps, strict=True):
                        key = (layer, t)
                        sums[key] = sums[key] + chunk if key in sums else chunk
        if self.concat_timesteps:
            sums = {
                (layer, None): torch.cat([sums[(layer, t)] for t in self.timesteps], dim=1)
                for layer in self.layers
            }
        return {key: sums[key] / self.noise_draws for key in self.keys}


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
        # The registry imports this module: it is read when a source is built, not at import.
        from lightning_modules import BASELINES, METHODS, method_of

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
