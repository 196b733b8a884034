"""Preemption saves the current step and says so in the exit status.

Lightning already catches SIGTERM: it stops the loops at the next step by raising
``SIGTERMException``, a ``SystemExit`` whose status is 0, and saves nothing, so a preempted job
looked finished and lost everything since the last epoch's checkpoint. This callback writes
``last.ckpt`` at that step (atomically, through the trainer's checkpoint IO) and gives the exit
the status a shell reports for SIGTERM, 143. SLURM's warning signal (``--signal``, SIGUSR1 by
default) is treated as SIGTERM, unless Lightning's SLURM auto-requeue already handles it.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

# What a shell reports for a process that SIGTERM ended: 128 + the signal's number.
PREEMPTED_STATUS = 128 + signal.SIGTERM


class CheckpointOnPreemption(L.Callback):
    """On SIGTERM (or SIGUSR1) during ``fit``: ``last.ckpt`` at the current step in the
    checkpoint folder, then exit status 143. Re-running the same command resumes there."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning has set its handlers: under SLURM with auto-requeue, SIGUSR1 is its.
        usr1 = getattr(signal, "SIGUSR1", None)
        main_thread = threading.current_thread() is threading.main_thread()
        if usr1 is not None and main_thread and signal.getsignal(usr1) == signal.SIG_DFL:
            signal.signal(usr1, _as_sigterm)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        usr1 = getattr(signal, "SIGUSR1", None)
        if usr1 is not None and signal.getsignal(usr1) is _as_sigterm:
            signal.signal(usr1, signal.SIG_DFL)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        exception.code = PREEMPTED_STATUS
        checkpoints = trainer.checkpoint_callback
        if trainer.state.fn != "fit" or not isinstance(checkpoints, ModelCheckpoint):
            return
        path = Path(checkpoints.dirpath) / f"{checkpoints.CHECKPOINT_NAME_LAST}.ckpt"
        trainer.save_checkpoint(path)  # every rank: saving is collective
        rank_zero_info(f"Preempted at step {trainer.global_step}: saved {path}")


def _as_sigterm(signum: int, frame: object) -> None:
    """SIGUSR1 handled as SIGTERM: Lightning's handler then stops the loops at the next step."""
    os.kill(os.getpid(), signal.SIGTERM)
