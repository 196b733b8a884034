"""The suite's Trainer: Lightning's, with ``precision: auto`` resolved for the machine at hand.

bfloat16 autocast pays only where the hardware computes in bfloat16. On a CPU without native
bfloat16 (AVX2 only: no AVX512-BF16, no AMX) PyTorch emulates it, and ``bf16-mixed`` trained the
diffusion config several times slower than ``32-true``; on a CPU that has it, faster
(``docs/tuning/diffusion.md``). So the shared
default is ``auto``, resolved once per run from what the accelerator can do, and an explicit
precision always wins.

Every run also gets the suite's safeguards: divergence stops it, preemption saves its step, and
its checkpoints are written whole or not at all.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from .checkpoint_io import AtomicCheckpointIO
from .divergence import StopOnDivergence
from .preemption import CheckpointOnPreemption
from .run_lock import LockRunFolder


def _cpu_bf16_units() -> list[str]:
    """The CPU's units that compute in bfloat16 natively."""
    units = {
        "AVX512-BF16": torch.cpu._is_avx512_bf16_supported(),
        "AMX": torch.cpu._is_amx_tile_supported(),
    }
    return [name for name, present in units.items() if present]


def _uses_cuda(accelerator: object) -> bool:
    if accelerator in ("gpu", "cuda"):
        return True
    return accelerator == "auto" and torch.cuda.is_available()


def resolve_precision(accelerator: object = "auto") -> tuple[str, str]:
    """``(precision, reason)`` for ``precision: auto`` on ``accelerator``.

    CUDA: ``bf16-mixed`` where the card computes in bfloat16, else ``16-mixed``. CPU:
    ``bf16-mixed`` with AVX512-BF16 or AMX, else ``32-true``.
    """
    if _uses_cuda(accelerator):
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16-mixed", f"{name} computes in bfloat16"
        return "16-mixed", f"{name} has no native bfloat16"
    if accelerator not in ("auto", "cpu"):
        return "32-true", f"accelerator {accelerator!r}: full precision is the safe choice"
    units = _cpu_bf16_units()
    if units:
        return "bf16-mixed", f"this CPU computes in bfloat16: it has {' and '.join(units)}"
    return "32-true", (
        "this CPU has neither AVX512-BF16 nor AMX, so bfloat16 is emulated and bf16-mixed "
        "would be several times slower than 32-true"
    )


class PlanktonTrainer(L.Trainer):
    """``lightning.Trainer`` whose ``precision`` may also be ``auto`` (the suite's default).

    Args:
        precision: ``auto`` picks the fastest precision this machine computes natively (see
            ``resolve_precision``) and logs the choice; any Lightning precision is used as given.
        **kwargs: every other ``lightning.Trainer`` argument.
    """

    def __init__(
        self, *, precision: _PRECISION_INPUT | Literal["auto"] | None = "auto", **kwargs: object
    ) -> None:
        if precision == "auto":
            precision, reason = resolve_precision(kwargs.get("accelerator", "auto"))
            rank_zero_info(f"precision: auto -> {precision} ({reason})")
        else:
            rank_zero_info(f"precision: {precision} (as set)")
        _add_safeguards(kwargs)  # in place: jsonargparse reads the Trainer's arguments from the
        super().__init__(precision=precision, **kwargs)  # plain forwarding of **kwargs


def _add_safeguards(kwargs: dict) -> None:
    """The suite's safeguards added to the Trainer arguments given: a run that diverges
    stops (``StopOnDivergence``), a preempted one saves its step (``CheckpointOnPreemption``),
    no second process writes its folder (``LockRunFolder``), and checkpoints are written
    atomically (``AtomicCheckpointIO``, unless a checkpoint IO is given)."""
    callbacks = _as_list(kwargs.get("callbacks"))
    for guard in (StopOnDivergence, CheckpointOnPreemption, LockRunFolder):
        if not any(isinstance(callback, guard) for callback in callbacks):
            callbacks.append(guard())
    plugins = _as_list(kwargs.get("plugins"))
    if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
        plugins.append(AtomicCheckpointIO())
    kwargs.update(callbacks=callbacks, plugins=plugins)


def _as_list(value: object) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]
