"""Launched by test_baselines.py: a two-process CPU DDP fit (gloo) of a baseline; every rank saves
its weights, its logged metrics and, for SimCLR, its share of the NT-Xent loss on a fixed batch."""

import sys
from pathlib import Path

import lightning as L
import torch
from lightly.loss import NTXentLoss

from datamodules import PlanktonDataModule, SyntheticPlankton
from lightning_modules import SimCLRModule, SupervisedModule

if __name__ == "__main__":
    method, out = sys.argv[1], Path(sys.argv[2])
    spec = SyntheticPlankton(classes=4, per_class=24, imbalance=4.0, size=32, seed=3)
    data = PlanktonDataModule(
        synthetic=spec, image_size=16, batch_size=8, progress=False, cache_dir=str(out / "cache")
    )
    cls = {"supervised": SupervisedModule, "simclr": SimCLRModule}[method]
    model = cls(num_classes=4, image_size=16, in_chans=1)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=out,
    )
    trainer.fit(model, data)
    saved = {
        "step": trainer.global_step,
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "metrics": {
            k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith("val")
        },
    }
    if method == "simclr":
        # Both ranks draw the same global batch of projections and each keeps its half.
        generator = torch.Generator().manual_seed(0)
        first, second = torch.randn(2, 8, 16, generator=generator)
        half = slice(4 * trainer.global_rank, 4 * trainer.global_rank + 4)
        rank_loss = model.criterion(first[half], second[half])
        saved["mean_rank_loss"] = trainer.strategy.reduce(rank_loss, reduce_op="mean").item()
        saved["global_batch_loss"] = NTXentLoss(model.hparams.temperature)(first, second).item()
    torch.save(saved, out / f"rank{trainer.global_rank}.pt")
