"""Checkpoints written whole or not at all, and never read back with non-finite weights.

Lightning's ``TorchCheckpointIO`` writes in place, so a full disk leaves a truncated file under
the checkpoint's own name, which the next run takes as the newest. Here every checkpoint is
written under a temporary name in its own folder and renamed into place: a failed write leaves
the previous checkpoint as it was. A checkpoint whose weights hold NaN or infinity (a diverged
run written before the suite stopped such runs) is refused on every read.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from datamodules.store import write_atomic


def non_finite_tensors(checkpoint: dict) -> list[str]:
    """Names of the floating-point tensors of ``checkpoint["state_dict"]`` that hold NaN or
    infinity."""
    return [
        name
        for name, tensor in checkpoint.get("state_dict", {}).items()
        if torch.is_tensor(tensor)
        and tensor.is_floating_point()
        and not bool(torch.isfinite(tensor).all())
    ]


def check_finite(checkpoint: dict, path: str | Path) -> None:
    """Refuse a checkpoint with non-finite weights, naming the file and the first tensors.

    Raises:
        ValueError: a floating-point tensor of the state dict holds NaN or infinity.
    """
    bad = non_finite_tensors(checkpoint)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ValueError(
            f"{path} holds non-finite weights ({shown}): its run diverged; train again with a "
            "lower learning rate or --trainer.precision 32-true"
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes through a temporary file in the checkpoint's folder
    (``.NAME.PID@HOST.tmp``, which no ``*.ckpt`` lookup matches) and refuses to write or read a
    checkpoint with non-finite weights. A disk error names the folder (the CLI adds the setting that
    moves it)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        check_finite(checkpoint, path)  # never a checkpoint a later read refuses
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, lambda staging: _save_synced(checkpoint, staging))
        except OSError as error:
            reason = error.strerror or os.strerror(error.errno or errno.EIO)
            message = f"{reason} writing the checkpoint {path.name} (the previous one is kept)"
            raise OSError(error.errno, message, str(path.parent)) from None

    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(path, map_location, weights_only)
        check_finite(checkpoint, path)
        return checkpoint


def _save_synced(checkpoint: dict, staging: Path) -> None:
    """``torch.save`` to ``staging``, flushed to the disk before it is renamed into place."""
    with open(staging, "wb") as file:
        torch.save(checkpoint, file)
        file.flush()
        os.fsync(file.fileno())
