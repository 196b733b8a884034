"""One process per run folder.

Two processes writing one run folder interleave their event files, checkpoints and markers, and
each takes the other's ``last.ckpt`` and ``done.json`` as its own. A run folder is therefore
locked for the life of the process that writes it: ``.plankton.lock`` holds ``pid@host`` and is
removed when the process ends. A lock left by a process that was killed (same host, pid no
longer running) is taken over with a warning; one held by a live process, or by another host,
refuses the second process in one line naming the holder.
"""

from __future__ import annotations

import atexit
import os
import socket
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from datamodules.store import owner_token, runs_here, token_owner

LOCK_NAME = ".plankton.lock"


class FolderInUse(ValueError):
    """Another live process holds the folder's lock (one line; a user's mistake, not a bug)."""


def _has_ended(holder: str) -> bool:
    """Whether the ``pid@host`` holder is known to have ended: only a pid of this host can be
    checked; another host's holder counts as live."""
    owner = token_owner(holder)
    return owner is not None and owner[1] == socket.gethostname() and not runs_here(owner[0])


class FolderLock:
    """The lock of ``folder`` for ``what`` (a command, named in the refusal). ``acquire`` takes
    it or raises ``FolderInUse``; ``release`` (also run at exit) removes it if this process
    holds it. Taking a lock this process already holds does nothing."""

    def __init__(self, folder: str | Path, what: str) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.what = what

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder == owner_token():
                    return
                if holder is not None and not _has_ended(holder):
                    raise FolderInUse(
                        f"{self.path.parent}: in use by process {holder} ({self.what}); wait "
                        f"for it to end or write elsewhere (if it is gone, delete {self.path})"
                    ) from None
                warnings.warn(
                    f"{self.path.parent}: taking over the lock of process {holder}, which has "
                    "ended", stacklevel=2,
                )  # fmt: skip
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w") as file:
                file.write(owner_token())
            atexit.register(self.release)
            return

    def _holder(self) -> str | None:
        try:
            return self.path.read_text().strip() or None
        except FileNotFoundError:
            return None  # released meanwhile: the next attempt takes it

    def release(self) -> None:
        if self._holder() == owner_token():
            self.path.unlink(missing_ok=True)


class LockRunFolder(L.Callback):
    """Locks the run's log folder (``version_N``) for the fit, on the process of rank zero."""

    def __init__(self) -> None:
        self.lock: FolderLock | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        folder = trainer.log_dir  # on every rank: finding it is collective
        if stage == "fit" and folder is not None and rank_zero_only.rank == 0:
            self.lock = FolderLock(folder, "plankton fit")
            self.lock.acquire()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._release()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._release()  # a failed fit runs no teardown hook

    def _release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
