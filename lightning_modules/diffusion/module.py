"""``DiffusionModule``: label-free DDPM pretraining of the U-Net, with EMA weights and sampling."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from datamodules.views import Recipe, View, Views

from ..common.module import PlanktonModule, load_checkpoint
from .noise_schedule import NoiseSchedule
from .per_image_noise import per_image_noise
from .sampling import DiffusionSampleGrid
from .unet import UNet

# Hyperparameters that decide the U-Net's weights' shapes and meaning: a feature source or
# sampler rebuilt from a checkpoint takes exactly these.
ARCHITECTURE = (
    "in_chans",
    "image_size",
    "base_channels",
    "channel_mult",
    "num_res_blocks",
    "attention_resolutions",
    "num_heads",
    "schedule",
    "timesteps",
)


def diffusion_view(image_size: int, channels: int) -> View:
    """Flips and 90-degree rotations only, the 8 uniformly: the denoiser must learn the true
    image distribution."""
    return Views(((Recipe(), 1),), as_list=False)


class DiffusionModule(PlanktonModule):
    """Epsilon-prediction DDPM on unlabelled plankton images. The data's classes are kept in the
    checkpoint, unused in training; its channels and image size shape the U-Net.

    Args:
        base_channels: U-Net width of the first level.
        channel_mult: channel multiplier per level (its length is the number of levels).
        num_res_blocks: residual blocks per encoder level.
        attention_resolutions: feature-map sides with self-attention (16 = at 16x16).
        num_heads: attention heads.
        dropout: dropout in residual blocks.
        schedule: ``linear`` (DDPM) or ``cosine`` noise schedule.
        timesteps: number of diffusion steps T.
        lr: AdamW learning rate for a global batch of 128, scaled linearly with the batch.
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up.
        grad_clip: gradient-norm clipping (0 disables it).
        ema_decay: decay of the exponential moving average of the weights.
        ema_warmup: ramp the decay up as ``(1 + step) / (10 + step)``, so early EMA weights are
            not dominated by the random initialisation.
        val_timesteps: timesteps at which the validation loss is measured. Each validation
            image is noised at one of them (by its position in the split, in turn) with noise
            fixed per image, so epochs are comparable and validation costs one forward pass per
            image.
        val_images: validation reads this many images, spread evenly over the validation split
            and the same every epoch (0: all of them); enough for a monitoring number at a few
            percent of an epoch's cost.
        seed: seed of the validation noise.
        sample_every_n_epochs: log a grid of EMA samples next to real images every N epochs
            (0 disables it).
        sample_count: images in the grid.
        sample_steps: DDIM steps of the logged samples.
        **data: the data's settings (``PlanktonModule``).
    """

    def __init__(
        self,
        base_channels: int = 32,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        num_heads: int = 4,
        dropout: float = 0.1,
        schedule: Literal["linear", "cosine"] = "linear",
        timesteps: int = 1000,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 200,
        grad_clip: float = 1.0,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        val_timesteps: Sequence[int] = (10, 50, 100, 250, 500, 750),
        val_images: int = 256,
        seed: int = 0,
        sample_every_n_epochs: int = 5,
        sample_count: int = 16,
        sample_steps: int = 50,
        **data: object,
    ) -> None:
        super().__init__(**data)
        # Every U-Net setting is a setting of this module under the same name.
        self.unet = UNet(
            **{name: self.hparams[name] for name in inspect.signature(UNet).parameters}
        )
        self.ema = copy.deepcopy(self.unet).requires_grad_(False)
        self.schedule = NoiseSchedule(schedule, timesteps)
        self.schedule.check(list(val_timesteps))

    def train_view(self, image_size: int, channels: int) -> View:
        return diffusion_view(image_size, channels)

    @property
    def val_images(self) -> int:
        """How many validation images the datamodule hands this module (0: all)."""
        return self.hparams.val_images

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The EMA model's noise prediction (what sampling and features use)."""
        return self.ema(x, timesteps)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        images = batch[0]
        t = torch.randint(0, self.schedule.timesteps, (images.shape[0],), device=self.device)
        noise = torch.randn_like(images)
        loss = F.mse_loss(self.unet(self.schedule.q_sample(images, t, noise), t), noise)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        self.update_ema()

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- decay * ema + (1 - decay) * weights; buffers are copied."""
        step = self.global_step
        decay = self.hparams.ema_decay
        if self.hparams.ema_warmup:
            decay = min(decay, (1 + step) / (10 + step))
        ema_params = list(self.ema.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in self.unet.parameters()], 1 - decay)
        for ema_buffer, buffer in zip(self.ema.buffers(), self.unet.buffers(), strict=True):
            ema_buffer.copy_(buffer)

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        images, _, indices = batch
        indices = indices.to(images.device)
        steps = self.hparams.val_timesteps
        slot = indices % len(steps)  # each image's timestep, the same every epoch
        t = torch.as_tensor(steps, device=images.device)[slot]
        chosen = [slot == i for i in range(len(steps))]
        noise = torch.empty_like(images)
        for step, mask in zip(steps, chosen, strict=True):
            noise[mask] = per_image_noise(
                indices[mask], step, self.hparams.seed, images.shape[1:]
            ).to(images)
        predicted = self.ema(self.schedule.q_sample(images, t, noise), t)
        losses = (predicted.float() - noise).pow(2).flatten(1).mean(1)
        for step, mask in zip(steps, chosen, strict=True):
            if mask.any():
                loss = losses[mask].mean()
                self.log(f"val/loss_t{step}", loss, batch_size=int(mask.sum()), sync_dist=True)
        self.log("val/loss", losses.mean(), prog_bar=True, batch_size=len(losses), sync_dist=True)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        sampler: Literal["ddim", "ddpm"] = "ddim",
        steps: int = 50,
        seed: int = 0,
    ) -> torch.Tensor:
        """``n`` images in [-1, 1] from the EMA weights."""
        shape = (n, self.hparams.in_chans, self.hparams.image_size, self.hparams.image_size)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        was_training = self.ema.training
        self.ema.eval()
        try:
            if sampler == "ddpm":
                return self.schedule.ddpm_sample(self.ema, shape, generator, self.device)
            return self.schedule.ddim_sample(self.ema, shape, steps, 0.0, generator, self.device)
        finally:
            self.ema.train(was_training)

    def configure_optimizers(self) -> dict:
        global_batch = self.trainer.world_size * getattr(self.trainer.datamodule, "batch_size", 128)
        optimizer = torch.optim.AdamW(
            self.unet.parameters(),
            lr=self.hparams.lr * global_batch / 128,
            weight_decay=self.hparams.weight_decay,
        )
        warmup = max(1, self.hparams.warmup_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / warmup)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        clip = gradient_clip_val or self.hparams.grad_clip
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def configure_callbacks(self) -> list[Callback]:
        if self.hparams.sample_every_n_epochs <= 0:
            return []
        return [
            DiffusionSampleGrid(
                self.hparams.sample_every_n_epochs,
                self.hparams.sample_count,
                self.hparams.sample_steps,
            )
        ]


def _plain(value: object) -> object:
    return list(value) if isinstance(value, list | tuple) else value


def load_diffusion(path: str | Path, expected: dict | None = None) -> DiffusionModule:
    """A DiffusionModule from a checkpoint, in eval mode, read by ``load_checkpoint`` (no code
    from the file runs). ``expected`` holds the architecture settings a config asks for; any
    that differ from the checkpoint's are named."""
    checkpoint = load_checkpoint(path)
    settings = checkpoint.get("hyper_parameters", {})
    if "base_channels" not in settings:
        raise ValueError(f"{path} is not a DiffusionModule checkpoint")
    differing = [
        f"{key} is {_plain(settings.get(key))} in the checkpoint but {_plain(value)} in the config"
        for key, value in (expected or {}).items()
        if key in ARCHITECTURE and _plain(settings.get(key)) != _plain(value)
    ]
    if differing:
        raise ValueError(f"checkpoint {path} does not match the config: " + "; ".join(differing))
    return DiffusionModule.from_checkpoint(checkpoint)
