"""Self-supervised recipes at a short budget: each recipe pretrains with `plankton fit`, is probed
by the suite's encoder probe (L-BFGS, weight decay chosen on validation), and is scored by its
validation macro-F1 against logistic regression on raw pixels of the same data, measured in the
same run (`configs/probe_pixels.yaml`).

    python benchmarks/ssl_recipes.py                    # the demo's data and budget (25 epochs)
    python benchmarks/ssl_recipes.py --recipes simclr,dino --workers 4    # on a GPU, in parallel
    python benchmarks/ssl_recipes.py --epochs 2 --probe-epochs 3 --data configs/data/folder.yaml \\
        --data-setting source=path/to/ndsb_isiis --data-setting max_class_images=40

Every recipe is a method config with changes (RECIPES): `simclr` and `dino` are the defaults
(1.0 and 4.0 per 256 images), `_lightly` lightly's CIFAR-10 rate (0.12, tuned for 200 epochs),
`dino_lr1` DINO at SimCLR's rate. The last line gives each recipe's validation macro-F1 and its
margin over raw pixels.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness import CONFIGS, argument_parser, print_figures, work_dir

from workflows.lightning_cli import cli_arguments, tensorboard_logger
from workflows.report_readouts import best_validation_row

PROJECT = CONFIGS.parent
LR = "model.init_args.lr"

# name: (method, changes to its config)
RECIPES: dict[str, tuple[str, dict[str, object]]] = {
    "simclr_lightly": ("simclr", {LR: 0.12}),
    "simclr": ("simclr", {}),
    "dino_lightly": ("dino", {LR: 0.12}),
    "dino_lr1": ("dino", {LR: 1.0}),
    "dino": ("dino", {}),
}
# The collapse and kNN signals a pretraining run logs last, reported beside its probe score.
SIGNALS = ("val/knn_acc", "train/teacher_entropy_ratio", "train/embedding_std_ratio")


def fit(config: Path, folder: Path, epochs: int, settings: dict, args) -> None:
    """One `plankton fit` into ``folder`` (its output in ``folder/log.txt``)."""
    settings = {
        "trainer.max_epochs": epochs,
        "trainer.default_root_dir": str(folder),
        "trainer.logger": tensorboard_logger(folder),
        "trainer.enable_progress_bar": False,
        **{f"data.{key}": value for key, value in args.data_setting},
        **settings,
    }
    if args.quick:
        settings |= {"trainer.limit_train_batches": 2, "trainer.precision": "32-true"}
    command = [sys.executable, str(PROJECT / "cli.py"), "fit", "--config", str(config)]
    if args.data is not None:
        command += ["--data", str(args.data.resolve())]
    command += cli_arguments(settings)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "log.txt", "w") as log:
        finished = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT)
    if finished.returncode != 0:
        raise RuntimeError(f"{config.name} failed; its output is in {folder / 'log.txt'}")


def validation_macro_f1(folder: Path) -> float:
    """The best key's validation macro-F1 in a probe's ``probe_results.csv``."""
    best = best_validation_row(folder)
    if best is None:
        raise RuntimeError(f"the probe in {folder} wrote no probe_results.csv")
    return float(best["macro_f1"])


def last_signals(folder: Path) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder)).Reload()
    logged = set(events.Tags()["scalars"])
    return {tag.split("/")[1]: events.Scalars(tag)[-1].value for tag in SIGNALS if tag in logged}


def recipe_score(name: str, root: Path, args) -> dict[str, float]:
    method, changes = RECIPES[name]
    folder = root / name
    fit(CONFIGS / f"{method}.yaml", folder, args.epochs, changes, args)
    checkpoint = folder / "checkpoints" / "last.ckpt"
    probe = {"model.init_args.features.init_args.checkpoint": str(checkpoint)}
    fit(CONFIGS / "probe_encoder.yaml", folder / "probe", args.probe_epochs, probe, args)
    score = {"val_macro_f1": validation_macro_f1(folder / "probe"), **last_signals(folder)}
    print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in score.items()), flush=True)
    return score


def main() -> None:
    parser = argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated names")
    parser.add_argument("--epochs", type=int, default=25, help="pretraining epochs (the demo's)")
    parser.add_argument("--probe-epochs", type=int, default=30, help="L-BFGS probe epochs")
    parser.add_argument("--data", type=Path, help="a data config (default: the synthetic demo)")
    parser.add_argument(
        "--data-setting",
        type=lambda text: tuple(text.split("=", 1)),
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a data setting, e.g. source=path/to/images (repeatable)",
    )
    parser.add_argument("--workers", type=int, default=1, help="recipes trained at once")
    args = parser.parse_args()
    names = args.recipes.split(",")
    unknown = sorted(set(names) - set(RECIPES))
    if unknown:
        parser.error(f"--recipes: {unknown} unknown; choose among {', '.join(RECIPES)}")
    if args.quick:
        args.epochs, args.probe_epochs = 1, 1
    with work_dir(args.cache_dir) as root:
        # The data (and its cache) is built once, by the raw-pixel probe, before any recipe.
        os.environ.setdefault("PLANKTON_CACHE", str(root / "data"))
        fit(CONFIGS / "probe_pixels.yaml", root / "pixels", args.probe_epochs, {}, args)
        pixels = validation_macro_f1(root / "pixels")
        print(f"raw pixels: val_macro_f1 {pixels:.3f}", flush=True)
        with ThreadPoolExecutor(args.workers) as pool:
            runs = pool.map(lambda name: recipe_score(name, root, args), names)
            scores = dict(zip(names, runs, strict=True))
    figures = {"epochs": args.epochs, "pixels_val_macro_f1": round(pixels, 4)}
    for name, score in scores.items():
        figures[f"{name}_val_macro_f1"] = round(score["val_macro_f1"], 4)
        figures[f"{name}_minus_pixels"] = round(score["val_macro_f1"] - pixels, 4)
    print_figures(**figures)


if __name__ == "__main__":
    main()
