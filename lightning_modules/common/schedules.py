"""The learning-rate schedule the classifiers and encoders of the suite share."""

from __future__ import annotations

import math

import lightning as L
import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, trainer: L.Trainer, warmup_epochs: int) -> dict:
    """``configure_optimizers``' answer: linear warm-up over ``warmup_epochs``, then cosine decay
    to zero at the last step, stepped every batch."""
    total = max(1, trainer.estimated_stepping_batches)
    if trainer.train_dataloader is None:  # max_epochs: -1 skips loading it, but warm-up needs it
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    steps_per_epoch = total if math.isinf(batches) else batches // trainer.accumulate_grad_batches
    warmup = min(total - 1, warmup_epochs * max(1, steps_per_epoch))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def scaled_lr(trainer: L.Trainer, lr: float) -> float:
    """``lr`` given for a global batch of 256, scaled linearly to this run's global batch
    (batch size per device x devices x nodes), the rule of the SimCLR and DINO papers."""
    batch_size = getattr(trainer.datamodule, "batch_size", 256)
    return lr * batch_size * trainer.world_size * trainer.accumulate_grad_batches / 256
