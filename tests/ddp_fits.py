"""Launched once per test session (the ``ddp_fits`` fixture of conftest.py): two-process CPU DDP
fits (gloo) in one process group, one after another, as an experiment runs its stages. Each saves
what test_baselines.py, test_diffusion.py and test_probe.py compare between the ranks or with one
process:

- ``supervised/`` and ``simclr/``: every rank's weights and logged metrics and, for SimCLR, its
  share of the NT-Xent loss on a fixed batch;
- ``diffusion/``: every rank's EMA weights;
- ``probe/``: an L-BFGS probe's validation scores and its sharded feature cache
  (``fit_probe(out, 1)`` is the one-process run, called in the test process).
"""

import sys
from pathlib import Path

import lightning as L
import torch

from datamodules import PlanktonDataModule, SyntheticPlankton

SPEC = SyntheticPlankton(classes=4, per_class=24, imbalance=4.0, size=32, seed=3)


def _trainer(out: Path, devices: int = 2, **settings) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
        max_epochs=settings.pop("max_epochs", 1), logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        precision="32-true", default_root_dir=out, **settings,
    )  # fmt: skip


def _synthetic(out: Path) -> PlanktonDataModule:
    return PlanktonDataModule(
        synthetic=SPEC, image_size=16, batch_size=8, progress=False, cache_dir=str(out / "cache")
    )


def fit_baseline(method: str, out: Path) -> None:
    from lightly.loss import NTXentLoss

    from lightning_modules import SimCLRModule, SupervisedModule

    cls = {"supervised": SupervisedModule, "simclr": SimCLRModule}[method]
    model = cls(num_classes=4, image_size=16, in_chans=1)
    trainer = _trainer(out / method)
    trainer.fit(model, _synthetic(out))
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
    (out / method).mkdir(parents=True, exist_ok=True)
    torch.save(saved, out / method / f"rank{trainer.global_rank}.pt")


def fit_diffusion(out: Path) -> None:
    from lightning_modules import DiffusionModule

    model = DiffusionModule(
        image_size=16, base_channels=8, channel_mult=(1, 2), attention_resolutions=(8,),
        num_heads=2, timesteps=100, val_timesteps=(5,), sample_every_n_epochs=0,
    )  # fmt: skip
    trainer = _trainer(out / "diffusion", limit_val_batches=1)
    trainer.fit(model, _synthetic(out))
    (out / "diffusion").mkdir(parents=True, exist_ok=True)
    torch.save(
        {"step": trainer.global_step, "ema": model.ema.state_dict()},
        out / "diffusion" / f"ema_rank{trainer.global_rank}.pt",
    )


def fit_probe(out: Path, devices: int) -> None:
    from planted import CLASSES, PlantedFeatures, write_planted_images

    from lightning_modules import ProbeModule

    out = out / "probe"
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
    trainer = _trainer(out / f"run{devices}", devices, max_epochs=2)
    trainer.fit(probe, data)
    if trainer.is_global_zero:
        scores = {
            "acc": probe.val_acc,
            "macro_f1": probe.val_macro_f1,
            "weight": probe.heads.weight,
        }
        torch.save({k: v.detach().cpu() for k, v in scores.items()}, out / f"scores{devices}.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    fit_baseline("supervised", out)
    fit_baseline("simclr", out)
    fit_diffusion(out)
    fit_probe(out, 2)
