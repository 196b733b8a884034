"""A diverged run stops at the step it diverged, before it writes a checkpoint.

Without this, a learning rate far too high makes the loss NaN, the run exits 0 and its
``last.ckpt`` holds NaN weights that ``test`` and ``classify`` go on to use.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


class TrainingDiverged(ValueError):
    """A run's loss or weights became NaN or infinite (a setting to change, not a bug)."""


class StopOnDivergence(L.Callback):
    """After every training step: a non-finite loss or parameter ends the run with
    ``TrainingDiverged``, naming the run folder, the step and what to try. Under ``16-mixed``
    a non-finite loss alone is the gradient scaler's to handle (it skips that step), so there
    only the parameters count. Ranks decide together, so all stop at the same step."""

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        parameters = [p.detach() for p in pl_module.parameters() if p.requires_grad]
        weights_finite = not parameters or bool(
            torch.isfinite(torch.nn.utils.get_total_norm(parameters))
        )
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        loss_finite = (
            not torch.is_tensor(loss)
            or str(trainer.precision).startswith("16")
            or bool(torch.isfinite(loss.detach()).all())
        )
        here = not (weights_finite and loss_finite)
        if trainer.strategy.reduce_boolean_decision(here, all=False):
            what = "the weights" if not weights_finite else "the loss" if here else "a rank's run"
            full = str(trainer.precision) in ("32-true", "32", "64-true", "64")
            advice = "" if full else ", or train in full precision (--trainer.precision 32-true)"
            raise TrainingDiverged(
                f"{trainer.log_dir or trainer.default_root_dir}: {what} became NaN or infinite "
                f"at step {trainer.global_step}; no checkpoint of this step is kept. Lower the "
                f"learning rate (--model.init_args.lr){advice}"
            )
