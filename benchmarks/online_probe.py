"""What the online probe costs during diffusion pretraining: the seconds of one probe (the EMA
U-Net's features of its fixed subset, then the logistic regressions) against the seconds of one
training epoch of the diffusion config at the demo size, measured in the same run. The cost per
epoch is that ratio divided by ``every_n_epochs``.
"""

from __future__ import annotations

import time

import lightning as L
from harness import CONFIGS, argument_parser, print_figures, work_dir

from lightning_modules import OnlineProbe
from workflows.lightning_cli import PlanktonCLI


class EpochClock(L.Callback):
    """Seconds of the last training epoch, data and optimiser included."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: object) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.seconds = time.perf_counter() - self.started


def main() -> None:
    parser = argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--every-n-epochs", type=int, default=5)
    args = parser.parse_args()
    defaults = OnlineProbe(every_n_epochs=args.every_n_epochs)
    with work_dir(args.cache_dir) as root:
        # --quick: a quarter of the demo's synthetic set; the ratio is what matters.
        size = ["--data.synthetic.per_class", "75"] if args.quick else []
        cli = PlanktonCLI(
            ["--config", str(CONFIGS / "diffusion.yaml"), "--data.cache_dir", str(root),
             "--data.progress", "false", "--trainer.default_root_dir", str(root),
             "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
             "--trainer.callbacks", "[]", "--trainer.enable_progress_bar", "false",
             "--trainer.limit_val_batches", "0", "--trainer.max_epochs", "2",
             "--model.init_args.sample_every_n_epochs", "0", *size],
            run=False,
        )  # fmt: skip
        clock = EpochClock()
        cli.trainer.callbacks.append(clock)
        cli.trainer.fit(cli.model, cli.datamodule)  # the second epoch is timed (warm)
        started = time.perf_counter()
        scores = defaults.probe(cli.model, cli.datamodule)
        probe_seconds = time.perf_counter() - started
    epoch_images = len(cli.datamodule.dataset("train"))
    print(
        f"one epoch: {clock.seconds:.1f} s over {epoch_images} images; one probe: "
        f"{probe_seconds:.1f} s ({len(scores)} keys, best val macro-F1 {max(scores.values()):.3f})"
    )
    print_figures(
        epoch_s=round(clock.seconds, 2),
        probe_s=round(probe_seconds, 2),
        probe_vs_epoch=round(probe_seconds / clock.seconds, 3),
        every_n_epochs=args.every_n_epochs,
        cost_per_epoch=round(probe_seconds / clock.seconds / args.every_n_epochs, 3),
        precision=str(cli.trainer.precision),
    )


if __name__ == "__main__":
    main()
