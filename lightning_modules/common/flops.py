"""Training FLOPs of a run, counted by ``torch.utils.flop_counter`` on one step, so a report can
state what each method's row cost and a benchmark its MFU."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils import flop_counter


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:  # noqa: ANN001
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter_mode() -> flop_counter.FlopCounterMode:
    """A quiet FlopCounterMode (matrix products, convolutions and attention; elementwise work and
    normalisation count zero, as in every MFU figure). PyTorch registers formulas only for the
    GPU attention kernels; the CPU flash kernel gets the same ones, so a model's FLOPs do not
    depend on where they were counted."""
    aten = torch.ops.aten
    return flop_counter.FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
        },
    )


class StepFlops(L.Callback):
    """FLOPs per image of the first training step of an attempt: forward (every view, a teacher's
    too), backward and the optimiser step. Counting slows that one step down."""

    def __init__(self) -> None:
        self.counter: flop_counter.FlopCounterMode | None = None
        self.per_image = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if self.counter is None:
            self.counter = flop_counter_mode()
            self.counter.__enter__()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        module: L.LightningModule,
        outputs: object,
        batch: tuple,
        *args: object,
    ) -> None:
        if self.counter is not None and not self.per_image:
            self.counter.__exit__(None, None, None)
            self.per_image = self.counter.get_total_flops() / len(batch[1])
