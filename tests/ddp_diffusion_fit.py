"""Launched by test_diffusion.py: a two-process CPU DDP fit (gloo) that saves each rank's EMA."""

import sys
from pathlib import Path

import lightning as L
import torch

from datamodules import PlanktonDataModule, SyntheticPlankton
from lightning_modules import DiffusionModule

if __name__ == "__main__":
    out = Path(sys.argv[1])
    spec = SyntheticPlankton(classes=4, per_class=24, imbalance=4.0, size=32, seed=3)
    data = PlanktonDataModule(
        synthetic=spec, image_size=16, batch_size=8, progress=False, cache_dir=str(out / "cache")
    )
    model = DiffusionModule(
        image_size=16,
        base_channels=8,
        channel_mult=(1, 2),
        attention_resolutions=(8,),
        num_heads=2,
        timesteps=100,
        val_timesteps=(5,),
        sample_every_n_epochs=0,
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        default_root_dir=out,
    )
    trainer.fit(model, data)
    torch.save(
        {"step": trainer.global_step, "ema": model.ema.state_dict()},
        out / f"ema_rank{trainer.global_rank}.pt",
    )
