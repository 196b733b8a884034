"""The learning-rate schedule the classifiers and encoders of the suite share."""

from __future__ import annotations

import math

import lightning as L
import torch


def warmup_cosine(optimizer: torch.optim.Optimizer, trainer: L.Trainer, warmup_epochs: int) -> dict:
    """``configure_optimizers``' answer: linear warm-up over ``warmup_epochs``, then cosine decay
    to zero at the last step, stepped every batch."""
    total = max(1, trainer.estimated_stepping_batches)
    warmup = min(total - 1, warmup_epochs * total // max(1, trainer.max_epochs or 1))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
