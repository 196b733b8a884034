"""The processes of one ``plankton experiment`` under DDP, and what they share.

The runner is rank-aware rather than launching every training run as a command of its own: under
``torchrun`` or SLURM the launcher has already started one process per device, each running the
whole experiment command, so the runner must be able to run inside such a process anyway; started
by hand with ``devices: N``, the process launches its N - 1 partners itself, the way Lightning's
``ddp`` strategy does, at the start of the experiment instead of at its first ``fit``. Every
process then runs every training, extraction, test and prediction (Lightning spreads them over
the ranks it finds in the process group); rank zero alone does the rest (data summaries, sample
grids, clustering, the report, the ``done.json`` markers) while the others wait at a barrier.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric import Fabric
from lightning.fabric.strategies import DDPStrategy
from lightning.pytorch.callbacks import BasePredictionWriter

# How long the other ranks wait at a barrier for rank zero's single-process work (scanning and
# caching a survey's images, clustering, the report) before the process group gives up; the
# collective default (30 minutes) is shorter than a cache build of millions of images.
RANK_ZERO_WORK_TIMEOUT = timedelta(hours=6)
# Set by the process that launches its partners: they end when it is gone (killed, crashed).
LAUNCHER_PID = "PLANKTON_EXPERIMENT_LAUNCHER_PID"
LAUNCH_SETTINGS = ("accelerator", "devices", "num_nodes", "strategy")


@dataclass(frozen=True)
class Processes:
    """This process's rank among the experiment's ``world_size`` processes."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_zero(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process gets here (after rank zero's writes, before reading them)."""
        if self.world_size > 1:
            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` (any picklable object), in rank order, on every process."""
        if self.world_size == 1:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered


def launch_processes(settings: dict[str, Any]) -> Processes:
    """Start (or join) the processes ``settings`` asks for: ``accelerator``, ``devices``,
    ``num_nodes`` and ``strategy`` as the trainer reads them. One process: nothing to do. More:
    the process group every later ``Trainer`` joins, started by Lightning's launcher, which
    also recognises ``torchrun`` and SLURM."""
    settings = {key: settings[key] for key in LAUNCH_SETTINGS if key in settings}
    strategy = settings.pop("strategy", "auto")
    if Fabric(**settings).world_size == 1:
        launched = int(os.environ.get("WORLD_SIZE", "1"))  # what torchrun (or a launcher) set
        if launched > 1:
            raise ValueError(
                f"this process is one of {launched} that were started together, but the "
                "experiment's trainer settings ask for one: set trainer_overrides to "
                "{devices: <processes per node>, num_nodes: <nodes>, strategy: ddp}"
            )
        return Processes()
    if strategy not in ("auto", "ddp") and not str(strategy).startswith("ddp_find_unused"):
        raise ValueError(
            f"trainer_overrides.strategy {strategy!r}: an experiment on several devices runs "
            "one process per device (strategy: ddp), launched by the command itself, by "
            "torchrun or by SLURM's srun; spawned or forked processes cannot run its stages"
        )
    os.environ.setdefault(LAUNCHER_PID, str(os.getpid()))
    fabric = Fabric(**settings, strategy=DDPStrategy(timeout=RANK_ZERO_WORK_TIMEOUT))
    fabric.launch()
    if os.environ[LAUNCHER_PID] != str(os.getpid()):
        _end_with_launcher(int(os.environ[LAUNCHER_PID]))
    return Processes(fabric.global_rank, fabric.world_size)


def _end_with_launcher(launcher: int) -> None:
    """End this process when the one that launched it is gone. Lightning's launcher ends the
    whole job when one of its children dies; this is the other direction, without which the
    children would wait in their next collective until it times out."""

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(1.0)
        print(f"the experiment's launching process {launcher} ended; ending too", file=sys.stderr)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="launcher-watch").start()


class GatheredPredictions(BasePredictionWriter):
    """The predictions of one ``trainer.predict`` in dataset order, on every rank. Under DDP,
    Lightning's sampler gives each rank a share of the images (each image once) and records
    which images each batch held; this puts the shares back together."""

    def __init__(self, processes: Processes) -> None:
        super().__init__(write_interval="epoch")
        self.processes = processes
        self.values: np.ndarray | None = None

    def write_on_epoch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        predictions: list[torch.Tensor],
        batch_indices: list[list[list[int]]],
    ) -> None:
        [indices] = batch_indices  # one dataloader
        rows = np.concatenate([np.asarray(batch, dtype=np.int64) for batch in indices])
        values = torch.cat(predictions).float().numpy()
        shares = self.processes.gather((rows, values))
        rows = np.concatenate([share_rows for share_rows, _ in shares])
        if not np.array_equal(np.sort(rows), np.arange(len(rows))):
            raise RuntimeError("the ranks' predictions do not cover each image exactly once")
        self.values = np.concatenate([share for _, share in shares])[np.argsort(rows)]
