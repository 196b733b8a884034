"""The sampling callback: EMA samples next to real images in TensorBoard every N epochs."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from ..common.figures import image_grid


class DiffusionSampleGrid(Callback):
    """Every N epochs, a grid of EMA samples next to a grid of real validation images."""

    def __init__(self, every_n_epochs: int = 5, count: int = 16, steps: int = 50) -> None:
        self.every_n_epochs = every_n_epochs
        self.count = count
        self.steps = steps

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if trainer.sanity_checking or epoch % self.every_n_epochs:
            return
        if not isinstance(trainer.logger, TensorBoardLogger):
            return
        samples = pl_module.sample(self.count, "ddim", self.steps, seed=0)
        dataset = trainer.datamodule.dataset("val")
        real = [dataset[i][0] for i in range(min(self.count, len(dataset)))]
        writer = trainer.logger.experiment
        writer.add_image("diffusion/samples", image_grid(samples), trainer.global_step)
        if real:
            writer.add_image("diffusion/real", image_grid(torch.stack(real)), trainer.global_step)
