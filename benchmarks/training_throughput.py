"""Training images per second of every method, at the size its config gives (the demo size), so a
report can state the compute each method used. Each method is built from its own config through
the CLI, with the shared trainer settings (bf16-mixed; on a GPU when one is present), and trained
for a few steps after a warm-up; the clock covers data loading and augmentation too, since a
method's views are part of its cost.

Figures are images per second (an image counted once, whatever its number of views) and each
method's ratio to the supervised baseline measured in the same run.
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from harness import argument_parser, print_figures, work_dir

from cli import PlanktonCLI

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METHODS = ("supervised", "diffusion", "simclr", "dino")


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


def images_per_second(method: str, root: Path, steps: int, warmup: int) -> float:
    cli = PlanktonCLI(
        ["--config", str(CONFIGS / f"{method}.yaml"), "--data.cache_dir", str(root),
         "--data.progress", "false", "--trainer.default_root_dir", str(root / method),
         "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
         "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
         "--trainer.limit_val_batches", "0", "--trainer.max_epochs", "-1",
         "--trainer.max_steps", str(warmup + steps)],
        run=False,
    )  # fmt: skip
    clock = StepClock(warmup)
    cli.trainer.callbacks.append(clock)
    cli.trainer.fit(cli.model, cli.datamodule)
    return clock.images / clock.seconds


def main() -> None:
    parser = argument_parser(__doc__.split("\n\n")[0])
    args = parser.parse_args()
    steps, warmup = (3, 1) if args.quick else (20, 3)
    with work_dir(args.cache_dir) as root:
        rates = {method: images_per_second(method, root, steps, warmup) for method in METHODS}
    figures = {f"{m}_img_per_s": round(rate, 1) for m, rate in rates.items()}
    for method in METHODS[1:]:
        figures[f"{method}_vs_supervised"] = round(rates[method] / rates["supervised"], 3)
    print_figures(**figures)


if __name__ == "__main__":
    main()
