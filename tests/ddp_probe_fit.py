"""Launched by test_probe.py: an L-BFGS probe fit on ``devices`` CPU processes (gloo under DDP)
that saves the validation scores of every head."""

import sys
from pathlib import Path

import lightning as L
import torch
from planted import CLASSES, PlantedFeatures, write_planted_images

from datamodules import PlanktonDataModule
from lightning_modules import ProbeModule

if __name__ == "__main__":
    out, devices = Path(sys.argv[1]), int(sys.argv[2])
    images = out / "images"
    if not images.exists():
        write_planted_images(images)
    data = PlanktonDataModule(
        source=str(images), image_size=8, batch_size=32, progress=False,
        cache_dir=str(out / "cache"),
    )  # fmt: skip
    probe = ProbeModule(
        PlantedFeatures(), num_classes=CLASSES, solver="lbfgs", fusion_top_k=0,
        cache_dir=str(out / f"features{devices}"),  # each run extracts its own
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=out / f"run{devices}",
    )  # fmt: skip
    trainer.fit(probe, data)
    if trainer.is_global_zero:
        scores = {"acc": probe.val_acc, "macro_f1": probe.val_macro_f1, "weight": probe.weight}
        torch.save({k: v.detach().cpu() for k, v in scores.items()}, out / f"scores{devices}.pt")
