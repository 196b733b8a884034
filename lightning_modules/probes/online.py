"""An online linear probe during diffusion pretraining: is the U-Net's representation getting
better, and which checkpoint probes best?

The diffusion loss says how well the U-Net denoises, not how useful its features are, and the
two part ways: DDAE's best checkpoint for probing (90.05% at epoch 800) came before its best one
for generation (88.23% at the best-FID epoch). SimCLR and DINO carry an online classifier; this
callback gives diffusion the same signal. Pretraining stays label-free: the labels of a fixed
subset are read only here, to monitor and to pick a checkpoint, never by the training step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from datamodules.store import staging_path

from ..diffusion.module import DiffusionModule
from .features import DiffusionFeatures, FeatureKey, UNetFeatures

BEST_PROBE_CHECKPOINT = "best_probe.ckpt"


class OnlineProbe(L.Callback):
    """Every ``every_n_epochs`` epochs, read the EMA U-Net's features of a fixed labelled subset
    (``train_images`` training and ``val_images`` validation images, spread evenly over their
    splits) at ``layers`` x ``timesteps``, fit scikit-learn's L-BFGS logistic regression per key
    on the training part, and log the best key's validation macro-F1 to TensorBoard
    (``online_probe/val_macro_f1``); ``history`` (kept in checkpoints) names each epoch's best
    key. With ``keep_best`` the checkpoint of the best epoch so far is written as
    ``best_probe.ckpt`` beside ``last.ckpt``.

    Its cost is one U-Net forward per image and timestep (no backward) plus the small fits:
    about ``(train_images + val_images) x len(timesteps) / (3 x training images)`` of an epoch,
    divided by ``every_n_epochs`` (a training step costs about three forwards).

    Args:
        every_n_epochs: how often to probe (after that epoch's training).
        layers: U-Net blocks, names, patterns or resolutions (as ``DiffusionFeatures``).
        timesteps: noise levels; low ones carry the most class information (DDAE: t=11 of 1000).
        train_images: labelled training images the probe is fitted on.
        val_images: validation images it is scored on.
        keep_best: write ``best_probe.ckpt`` whenever the score improves.
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        layers: Sequence[str | int] = ("*",),
        timesteps: Sequence[int] = (11, 50),
        train_images: int = 256,
        val_images: int = 256,
        keep_best: bool = True,
    ) -> None:
        if every_n_epochs < 1 or train_images < 2 or val_images < 1:
            raise ValueError(
                "OnlineProbe needs every_n_epochs >= 1, train_images >= 2 and val_images >= 1, "
                f"got {every_n_epochs}, {train_images}, {val_images}"
            )
        self.every_n_epochs = every_n_epochs
        self.layers, self.timesteps = list(layers), [int(t) for t in timesteps]
        self.train_images, self.val_images = train_images, val_images
        self.keep_best = keep_best
        self.best_score = -1.0
        self.history: list[dict] = []

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best_score = state_dict["best_score"]
        self.history = state_dict["history"]

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not isinstance(module, DiffusionModule):
            raise TypeError(f"OnlineProbe probes a DiffusionModule, not {type(module).__name__}")
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        scores = self.probe(module, trainer.datamodule)
        key, score = max(scores.items(), key=lambda item: item[1])
        self.history.append({"epoch": trainer.current_epoch, "key": list(key), "score": score})
        module.log("online_probe/val_macro_f1", score)
        if self.keep_best and score > self.best_score:
            self.best_score = score
            self._save_best(trainer)

    @torch.no_grad()
    def probe(self, module: DiffusionModule, datamodule: object) -> dict[FeatureKey, float]:
        """Validation macro-F1 of a logistic regression per key, on the fixed subset."""
        features = DiffusionFeatures.from_unet(
            module.ema, module.schedule, layers=self.layers, timesteps=self.timesteps
        )
        train_x, train_y = self._features(features, datamodule, "train", self.train_images)
        val_x, val_y = self._features(features, datamodule, "val", self.val_images)
        scores = {}
        for key in features.keys:
            classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=200))
            predicted = classifier.fit(train_x[key], train_y).predict(val_x[key])
            scores[key] = float(f1_score(val_y, predicted, average="macro"))
        return scores

    def _features(
        self, features: UNetFeatures, datamodule: object, split: str, count: int
    ) -> tuple[dict[FeatureKey, np.ndarray], np.ndarray]:
        dataset = datamodule.dataset(split)
        spread = np.linspace(0, len(dataset) - 1, min(count, len(dataset))).round()
        positions = np.unique(spread).astype(np.int64).tolist()
        [(images, labels, indices)] = dataset.loader(len(positions), sampler=positions)
        device = next(features.unet.parameters()).device
        extracted = features(images.to(device), indices)
        return {k: v.float().cpu().numpy() for k, v in extracted.items()}, labels.numpy()

    def _save_best(self, trainer: L.Trainer) -> None:
        """The checkpoint of this epoch as ``best_probe.ckpt``, renamed into place whole."""
        folder = Path(trainer.checkpoint_callback.dirpath or trainer.default_root_dir)
        staging = staging_path(folder / BEST_PROBE_CHECKPOINT)
        # Not write_atomic: every rank takes part in saving, and only rank 0 writes.
        trainer.save_checkpoint(staging)
        rank_zero_only(os.replace)(staging, folder / BEST_PROBE_CHECKPOINT)
