"""The metrics every classifier of the suite reports, under the same names, and the calibration
every classifier keeps in its checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from datamodules.store import write_atomic

from .calibration import Calibration
from .module import PlanktonModule, load_checkpoint


def classification_metrics(num_classes: int) -> MetricCollection:
    """Accuracy (micro), macro-F1 and per-class F1, synced across processes under DDP."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "macro_f1": MulticlassF1Score(num_classes, average="macro"),
            "per_class_f1": MulticlassF1Score(num_classes, average=None),
        }
    )


def loggable(results: dict[str, torch.Tensor], prefix: str, class_names: list[str]) -> dict:
    """Flatten per-class F1 into ``{prefix}/f1/<class>`` scalars next to the summary metrics."""
    flat = {}
    for name, value in results.items():
        if name == "per_class_f1":
            flat.update({f"{prefix}/f1/{c}": v for c, v in zip(class_names, value, strict=True)})
        else:
            flat[f"{prefix}/{name}"] = value
    return flat


def resave_last_checkpoints(trainer: L.Trainer) -> None:
    """Write the module's state again into every checkpoint callback's ``last.ckpt``: for what
    ``on_train_end`` adds after the last epoch's checkpoint was saved. Every rank takes part (the
    collective ``save_checkpoint`` needs it under DDP); rank 0 writes."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.last_model_path:
            path, weights_only = callback.last_model_path, callback.save_weights_only
            trainer.save_checkpoint(path, weights_only=weights_only)


class CalibratedClassifier(PlanktonModule):
    """A classifier that calibrates itself on the validation split when training ends and keeps
    the result in its checkpoints (``Calibration``: temperature, rejection threshold, the
    quantifier of class abundance). ``predict`` and ``plankton classify`` return calibrated
    probabilities. Testing a checkpoint written before calibrations existed adds them to it.

    A subclass gives ``validation_logits``: the logits of ``classify`` under ``classify``, and of
    any other head it reports (a probe's fusion) under their own names. The hooks call ``super``,
    so this class mixes in before another base (``EvalSetClassifier``).
    """

    calibrations: dict[str, Calibration]
    # A subclass or a later base provides it: ``EvalSetClassifier``'s, or the probe's own.
    validation_logits: Callable[[], tuple[dict[str, torch.Tensor], torch.Tensor]]

    @torch.no_grad()
    def calibrate(self) -> None:
        was_training = self.training
        self.eval()
        logits, labels = self.validation_logits()
        self.train(was_training)
        counts = self.trainer.datamodule.class_counts
        self.calibrations = {name: Calibration.fit(x, labels, counts) for name, x in logits.items()}

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities of ``classify``'s logits, calibrated once the module has been."""
        calibration = getattr(self, "calibrations", {}).get("classify")
        return calibration.probabilities(logits) if calibration else logits.float().softmax(-1)

    def on_train_end(self) -> None:
        super().on_train_end()
        self.calibrate()
        resave_last_checkpoints(self.trainer)

    def on_test_start(self) -> None:
        super().on_test_start()
        self._calibration_added = not getattr(self, "calibrations", None)
        if self._calibration_added:
            self.calibrate()

    def on_test_end(self) -> None:
        super().on_test_end()
        path = self.trainer.ckpt_path
        if self._calibration_added and path and Path(path).is_file():
            rank_zero_only(_add_calibrations)(Path(path), self.calibrations)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if getattr(self, "calibrations", None):
            checkpoint["calibration"] = {k: c.to_dict() for k, c in self.calibrations.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        stored = checkpoint.get("calibration") or {}
        self.calibrations = {k: Calibration.from_dict(state) for k, state in stored.items()}


def _add_calibrations(path: Path, calibrations: dict[str, Calibration]) -> None:
    """Write ``calibrations`` into the checkpoint file ``path`` (atomically: a reader never sees
    half a checkpoint)."""
    checkpoint = load_checkpoint(path)
    checkpoint["calibration"] = {k: c.to_dict() for k, c in calibrations.items()}
    write_atomic(path, lambda staging: torch.save(checkpoint, staging))


class EvalSetClassifier(PlanktonModule):
    """``test`` on the test split and every out-of-distribution set, and ``predict`` as class
    probabilities, for any module whose ``classify(images)`` returns logits."""

    def classify(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _eval_set_names(self) -> list[str]:
        datamodule = getattr(self.trainer, "datamodule", None)
        return datamodule.eval_set_names if datamodule is not None else ["test"]

    def validation_logits(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``classify``'s logits of the whole validation split, and its labels."""
        dataset = self.trainer.datamodule.dataset("val")
        batch_size = self.trainer.datamodule.eval_batch_size
        logits = [
            self.classify(images.to(self.device)).float()
            for images, _, _ in dataset.loader(batch_size)
        ]
        labels = torch.as_tensor(dataset.labels, device=self.device)
        return {"classify": torch.cat(logits)}, labels

    def on_test_start(self) -> None:
        super().on_test_start()
        self.test_metrics = nn.ModuleList(
            classification_metrics(len(self.class_names)) for _ in self._eval_set_names()
        ).to(self.device)

    def test_step(self, batch: tuple, batch_idx: int, dataloader_idx: int = 0) -> None:
        images, labels, _ = batch
        self.test_metrics[dataloader_idx].update(self.classify(images), labels)

    def on_test_epoch_end(self) -> None:
        for name, metrics in zip(self._eval_set_names(), self.test_metrics, strict=True):
            # compute() already syncs across processes; sync_dist only averages equal values.
            self.log_dict(loggable(metrics.compute(), name, self.class_names), sync_dist=True)
            metrics.reset()

    def predict_step(self, batch: tuple, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self.probabilities(self.classify(batch[0]))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().softmax(-1)
