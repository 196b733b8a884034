"""Training images per second of every method, at the size its config gives (the demo size) or at
the paper's (``--size paper``: 64 px, the paper experiment's model overrides), so a report can
state the compute each method used. Each method is built from its own config through the CLI,
with the shared trainer settings (bf16-mixed; on a GPU when one is present), and trained for a
few steps after a warm-up; the clock covers data loading and augmentation too, since a method's
views are part of its cost.

Figures are images per second (an image counted once, whatever its number of views), each
method's ratio to the supervised baseline measured in the same run, each method's MFU (FLOPs of
one training step, all views and a teacher included, counted by FlopCounterMode and divided by
the images in the batch, times images per second, over the GPU's peak; empty off the peak table,
so on every CPU) and the precision the trainer resolved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from harness import (
    CONFIGS,
    SIZES,
    argument_parser,
    mfu,
    peak_flops,
    print_figures,
    size_overrides,
    work_dir,
)

from lightning_modules import BASELINES
from lightning_modules.common.flops import StepFlops
from workflows.lightning_cli import PlanktonCLI, cli_arguments

# Every registered method, each from its own config (configs/<name>.yaml); supervised first, as
# the baseline of the ratios.
METHODS = ("supervised", "diffusion", *(name for name in BASELINES if name != "supervised"))


class StepClock(L.Callback):
    """Images trained on and seconds spent after the first ``warmup`` steps."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.images, self.started, self.seconds = warmup, 0, None, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.warmup:
            self.started = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        module: L.LightningModule,
        outputs: object,
        batch: tuple,
        *args: object,
    ) -> None:
        if self.started is not None:
            self.images += len(batch[1])
            self.seconds = time.perf_counter() - self.started


@dataclass
class Throughput:
    images_per_second: float
    flops_per_image: float
    precision: str
    mfu: float | str


def method_cli(
    method: str, size: str, root: Path, max_steps: int, batch_size: int | None = None
) -> PlanktonCLI:
    """``method`` as ``plankton fit`` builds it from its config at ``size``, for ``max_steps``
    steps with nothing but training: no logger, checkpoints, validation or progress bar; at
    ``batch_size`` when given, else its config's."""
    batch = {} if batch_size is None else {"data.batch_size": batch_size}
    return PlanktonCLI(
        ["--config", str(CONFIGS / f"{method}.yaml"), "--data.cache_dir", str(root),
         "--data.progress", "false", "--trainer.default_root_dir", str(root / method),
         "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
         "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
         "--trainer.limit_val_batches", "0", "--trainer.max_epochs", "-1",
         "--trainer.max_steps", str(max_steps),
         *cli_arguments(size_overrides(method, size) | batch)],
        run=False,
    )  # fmt: skip


def measure(
    method: str, size: str, root: Path, steps: int, warmup: int, batch_size: int | None = None
) -> Throughput:
    cli = method_cli(method, size, root, warmup + steps, batch_size)
    clock, flops = StepClock(warmup), StepFlops()
    cli.trainer.callbacks += [clock, flops]
    cli.trainer.fit(cli.model, cli.datamodule)
    rate = clock.images / clock.seconds
    precision = str(cli.trainer.precision)
    peak = peak_flops(cli.trainer.strategy.root_device, precision)
    print(
        f"{method}: {rate:.1f} img/s, {flops.per_image / 1e9:.3f} GFLOP per image per training "
        f"step, {precision} on {cli.trainer.strategy.root_device}"
        + (f" (peak: {peak[0]})" if peak else ""),
        flush=True,
    )
    return Throughput(rate, flops.per_image, precision, mfu(rate, flops.per_image, peak))


def main() -> None:
    parser = argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="demo")
    parser.add_argument(
        "--batch-size", type=int, help="every method's training batch (default: its config's)"
    )
    args = parser.parse_args()
    # warmup >= 1: the first step is the one whose FLOPs are counted, and it runs slower.
    steps, warmup = (3, 1) if args.quick else (20, 3)
    with work_dir(args.cache_dir) as root:
        results = {m: measure(m, args.size, root, steps, warmup, args.batch_size) for m in METHODS}
    rates = {m: result.images_per_second for m, result in results.items()}
    figures: dict[str, float | str] = {f"{m}_img_per_s": round(r, 1) for m, r in rates.items()}
    for method in METHODS[1:]:
        figures[f"{method}_vs_supervised"] = round(rates[method] / rates["supervised"], 3)
    figures |= {f"{m}_mfu": result.mfu for m, result in results.items()}
    # Every method runs with the shared trainer config, so one precision; should a method's
    # config ever set its own, each is shown.
    precisions = {m: result.precision for m, result in results.items()}
    if len(set(precisions.values())) == 1:
        figures["precision"] = precisions[METHODS[0]]
    else:
        figures |= {f"{m}_precision": p for m, p in precisions.items()}
    print_figures(**figures)


if __name__ == "__main__":
    main()
