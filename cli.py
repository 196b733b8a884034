"""The ``plankton`` command: Lightning's ``fit``/``validate``/``test``/``predict`` plus the suite's
own commands (``data``, ``diffusion``, ``features``).

    plankton fit --config configs/diffusion.yaml
    plankton data synth --out data/synthetic --classes 12 --per-class 300
    plankton data inspect --root path/to/class_folders --json
    plankton diffusion sample --checkpoint last.ckpt --n 64 --out grid.png
    plankton features layers --checkpoint last.ckpt
    plankton features cluster --config configs/probe_diffusion.yaml
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import yaml
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from datamodules import PlanktonDataModule, SyntheticPlankton
from datamodules.cache import default_cache_dir
from datamodules.synthetic import DOMAINS, write_dataset
from lightning_modules.callbacks import save_grid
from lightning_modules.clustering import cluster_scores
from lightning_modules.diffusion import DiffusionModule, load_diffusion
from lightning_modules.feature_cache import load_or_extract
from lightning_modules.probe_reports import heatmap_figure
from lightning_modules.trainer import PlanktonTrainer

SUITE_COMMANDS = {
    "data": "synthesise or inspect a dataset",
    "diffusion": "sample images from a diffusion checkpoint",
    "features": "list the U-Net blocks, or cluster frozen features at every key",
    "experiment": "run the whole protocol (data, pretraining, probes, clustering, report)",
    "report": "rebuild an experiment's report from its run folder",
    "classify": "classify a folder of new images: top-k labels and an abundance table",
}


# Settings every model of the suite receives from the data (and keeps in its checkpoint).
DATA_TO_MODEL = [
    ("num_classes", "num_classes"),
    ("class_names", "class_names"),
    ("channels", "in_chans"),
    ("image_size", "image_size"),
]


class PlanktonCLI(LightningCLI):
    """LightningCLI over the one PlanktonDataModule and any LightningModule of the suite."""

    def __init__(self, args: list[str] | None = None, run: bool = True) -> None:
        super().__init__(
            model_class=LightningModule,
            datamodule_class=PlanktonDataModule,
            trainer_class=PlanktonTrainer,
            subclass_mode_model=True,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The data decides the classes and the image format; every model receives them.
        for data_setting, model_setting in DATA_TO_MODEL:
            parser.link_arguments(
                f"data.{data_setting}", f"model.init_args.{model_setting}", apply_on="instantiate"
            )

    def before_instantiate_classes(self) -> None:
        """Name the default TensorBoard run after the model, under ``default_root_dir``."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.trainer.logger in (None, True):
            model_name = config.model.class_path.rsplit(".", 1)[-1].removesuffix("Module").lower()
            config.trainer.logger = Namespace(
                class_path="lightning.pytorch.loggers.TensorBoardLogger",
                init_args=Namespace(
                    save_dir=config.trainer.default_root_dir or ".", name=model_name
                ),
            )


def data_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="plankton data", description=SUITE_COMMANDS["data"])
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="write a synthetic plankton dataset")
    defaults = SyntheticPlankton()
    synth.add_argument("--out", required=True, help="folder to create (must be new or empty)")
    synth.add_argument("--classes", type=int, default=defaults.classes)
    synth.add_argument(
        "--per-class", type=int, default=defaults.per_class, help="images of the most common class"
    )
    synth.add_argument(
        "--imbalance",
        type=float,
        default=defaults.imbalance,
        help="most / least common class (1 = balanced)",
    )
    synth.add_argument("--size", type=int, default=defaults.size, help="image side in pixels")
    synth.add_argument(
        "--domains", default=",".join(DOMAINS), help=f"comma-separated, among {','.join(DOMAINS)}"
    )
    synth.add_argument(
        "--ood-fraction",
        type=float,
        default=defaults.ood_fraction,
        help="size of each shifted domain relative to the source",
    )
    synth.add_argument("--seed", type=int, default=defaults.seed)

    inspect = commands.add_parser("inspect", help="scan a dataset as the DataModule would")
    where = inspect.add_mutually_exclusive_group(required=True)
    where.add_argument("--root", help="a class folder tree, WHOI folder, CSV or EcoTaxa TSV")
    where.add_argument("--config", help="a data config, or a model config with a 'data' section")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")

    args = parser.parse_args(argv)
    if args.command == "synth":
        spec = SyntheticPlankton(
            classes=args.classes,
            per_class=args.per_class,
            imbalance=args.imbalance,
            size=args.size,
            domains=[d.strip() for d in args.domains.split(",") if d.strip()],
            ood_fraction=args.ood_fraction,
            seed=args.seed,
        )
        manifest = write_dataset(spec, args.out)
        print(f"wrote {manifest}")
        return 0

    datamodule = (
        PlanktonDataModule(source=args.root, progress=not args.json)
        if args.root
        else datamodule_from_config(args.config, progress=not args.json)
    )
    summary = datamodule.summary
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        print(format_summary(summary.as_dict()))
    return 0


def diffusion_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="plankton diffusion", description=SUITE_COMMANDS["diffusion"]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sample = commands.add_parser("sample", help="write a grid of samples from the EMA weights")
    sample.add_argument("--checkpoint", required=True, help="a DiffusionModule checkpoint")
    sample.add_argument("--n", type=int, default=64, help="number of images")
    sample.add_argument("--out", required=True, help="PNG file to write")
    sample.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    sample.add_argument("--steps", type=int, default=50, help="DDIM steps")
    sample.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    module = load_diffusion(args.checkpoint)
    images = module.sample(args.n, args.sampler, args.steps, args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_grid(images, args.out)
    print(f"wrote {args.out}")
    return 0


def features_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="plankton features", description=SUITE_COMMANDS["features"]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    layers = commands.add_parser("layers", help="every U-Net block: name, resolution, channels")
    layers.add_argument("--checkpoint", help="a DiffusionModule checkpoint")
    layers.add_argument("--config", help="a diffusion model config (checked against --checkpoint)")
    cluster = commands.add_parser("cluster", help="k-means of every key, scored against labels")
    cluster.add_argument("--config", required=True, help="a probe config (features and data)")
    cluster.add_argument("--split", default="test", help="train, val, test or an OOD set")
    cluster.add_argument("--k", type=int, help="number of clusters (default: number of classes)")
    cluster.add_argument("--out", default="runs/clustering", help="folder for the CSV and heatmaps")
    cluster.add_argument("--seed", type=int, default=0)
    args, overrides = parser.parse_known_args(argv)
    if args.command == "cluster":
        return cluster_command(args, overrides)
    if overrides:
        parser.error(f"unrecognized arguments: {' '.join(overrides)}")
    if not (args.checkpoint or args.config):
        parser.error("give --checkpoint, --config or both")
    expected = model_settings_from_config(args.config) if args.config else None
    if args.checkpoint:
        unet = load_diffusion(args.checkpoint, expected).ema
    else:
        unet = DiffusionModule(**expected).unet
    print(f"{'block':<10} {'resolution':>10} {'channels':>9}")
    for info in unet.info.values():
        print(f"{info.name:<10} {info.resolution:>10} {info.channels:>9}")
    return 0


def cluster_command(args: argparse.Namespace, overrides: list[str]) -> int:
    """k-means per key on the features a probe config describes; extra ``--data.*`` or
    ``--model.*`` options override the config as in ``plankton fit``."""
    cli = PlanktonCLI(args=["--config", args.config, *overrides], run=False)
    datamodule, source = cli.datamodule, cli.model.features
    dataset = datamodule.dataset(args.split)
    cache_dir = cli.model.hparams.cache_dir or default_cache_dir()
    features = load_or_extract(source, dataset, cache_dir, progress=True)
    rows = cluster_scores(features, dataset.labels, args.k or datamodule.num_classes, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "clustering.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for score in ("nmi", "ari", "purity"):
        values = torch.tensor([row[score] for row in rows])
        figure = heatmap_figure(list(features), values, f"k-means {score} ({args.split})")
        figure.savefig(out / f"clustering_{score}.png", dpi=120)
        plt.close(figure)
    best = max(rows, key=lambda row: row["nmi"])
    where = best["layer"] + (f" t={best['timestep']}" if best["timestep"] != "" else "")
    print(f"wrote {out / 'clustering.csv'}; best NMI {best['nmi']:.3f} at {where}")
    return 0


def model_settings_from_config(path: str | Path) -> dict:
    """The ``model.init_args`` of a model config, with the linked data settings filled in."""
    content = yaml.safe_load(Path(path).read_text()) or {}
    settings = dict((content.get("model") or {}).get("init_args") or {})
    data = datamodule_from_config(path, progress=False)
    settings.setdefault("in_chans", data.channels)
    settings.setdefault("image_size", data.image_size)
    return settings


def datamodule_from_config(path: str | Path, **overrides: object) -> PlanktonDataModule:
    """A PlanktonDataModule from a data config or from the ``data`` section of a model config."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config {path} does not exist")
    content = yaml.safe_load(path.read_text()) or {}
    data = content.get("data", content) if isinstance(content, dict) else None
    if isinstance(data, str):  # ``data: data/synthetic.yaml``, relative to the config
        return datamodule_from_config(path.parent / data, **overrides)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of PlanktonDataModule settings")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(PlanktonDataModule, "data")
    config = parser.parse_object({"data": {**data, **overrides}})
    return parser.instantiate_classes(config).data


def format_summary(summary: dict) -> str:
    """A human-readable table of classes by split, then everything that was left out."""
    splits = list(summary["counts"])
    width = max([len(c) for c in summary["classes"]] + [5])
    lines = [f"{len(summary['classes'])} classes", ""]
    lines.append(f"{'class':<{width}}  " + "  ".join(f"{s:>10}" for s in splits))
    for name in summary["classes"]:
        row = "  ".join(f"{summary['counts'][s].get(name, 0):>10}" for s in splits)
        lines.append(f"{name:<{width}}  {row}")
    totals = "  ".join(f"{sum(summary['counts'][s].values()):>10}" for s in splits)
    lines.append(f"{'total':<{width}}  {totals}")
    for title, key in [
        ("dropped classes (min_per_class)", "dropped_classes"),
        ("training images unused by the balanced regime", "unused_train"),
    ]:
        if summary[key]:
            lines += ["", f"{title}:"] + [f"  {k}: {v}" for k, v in summary[key].items()]
    if summary["excluded"]:
        lines += ["", "excluded labels (unknown to training or dropped by class_map):"]
        for set_name, labels in summary["excluded"].items():
            lines += [f"  {set_name}: " + ", ".join(f"{k} ({v})" for k, v in labels.items())]
    lines += ["", f"skipped files: {len(summary['skipped'])}"]
    lines += [f"  {s['path']}: {s['reason']}" for s in summary["skipped"]]
    lines += [f"warning: {w}" for w in summary["warnings"]]
    return "\n".join(lines)


def experiment_command(argv: list[str]) -> int:
    from workflows.experiment import STAGES, Experiment, ExperimentRunner

    parser = argparse.ArgumentParser(
        prog="plankton experiment", description=SUITE_COMMANDS["experiment"]
    )
    parser.add_argument(
        "--config", required=True, help="an experiment config (configs/experiments)"
    )
    parser.add_argument("--out", help="run folder (default: runs/<name of the experiment>)")
    parser.add_argument("--force", choices=STAGES, help="redo this stage and every later one")
    args = parser.parse_args(argv)
    experiment = Experiment.from_file(args.config)
    out = Path(args.out or Path("runs") / experiment.name)
    report = ExperimentRunner(experiment, out).run(force=args.force)
    print(f"wrote {report}")
    return 0


def report_command(argv: list[str]) -> int:
    from workflows.report import build_report

    parser = argparse.ArgumentParser(prog="plankton report", description=SUITE_COMMANDS["report"])
    parser.add_argument("run_dir", help="the --out folder of plankton experiment")
    print(f"wrote {build_report(parser.parse_args(argv).run_dir)}")
    return 0


def classify_command(argv: list[str]) -> int:
    from workflows.classify import classify_folder

    parser = argparse.ArgumentParser(
        prog="plankton classify", description=SUITE_COMMANDS["classify"]
    )
    parser.add_argument("--checkpoint", required=True, help="a supervised or probe checkpoint")
    parser.add_argument("--images", required=True, help="a folder of images (subfolders too)")
    parser.add_argument("--out", default="predictions.csv", help="CSV of the predictions")
    parser.add_argument("--top-k", type=int, default=3, help="labels per image")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    summary = classify_folder(args.checkpoint, args.images, args.out, args.top_k, args.batch_size)
    outputs = summary["outputs"]
    print(f"classified {summary['images']} images on {summary['device']}: {outputs['predictions']}")
    print(f"abundance table: {outputs['counts']}")
    for name, count in list(summary["counts"].items())[:10]:
        print(f"  {name:<40} {count}")
    if summary["skipped"]:
        print(f"{summary['skipped']} unreadable files listed in {outputs['skipped']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from_console = argv is None
    argv = sys.argv[1:] if from_console else list(argv)
    commands = {
        "data": data_command,
        "diffusion": diffusion_command,
        "features": features_command,
        "experiment": experiment_command,
        "report": report_command,
        "classify": classify_command,
    }
    if argv and argv[0] in commands:
        # Suite commands build Lightning CLIs from their own arguments, not from sys.argv.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            return commands[argv[0]](argv[1:])
        except (OSError, ValueError) as error:  # bad paths, settings or disk space
            print(f"error: {error}", file=sys.stderr)
            return 2
    if argv and argv[0] in ("-h", "--help"):
        print("Suite commands:\n" + "\n".join(f"  {k:<10} {v}" for k, v in SUITE_COMMANDS.items()))
        print("\nLightning commands (fit, validate, test, predict):\n")
    PlanktonCLI(args=None if from_console else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
