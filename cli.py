"""The ``plankton`` command: argument parsing and printing only. Lightning's
``fit``/``validate``/``test``/``predict`` plus the suite's own commands (``COMMANDS``); the work is
done in ``workflows`` and below, and nothing imports this file.

    plankton fit --config configs/diffusion.yaml
    plankton data synth --out data/synthetic --classes 12 --per-class 300
    plankton data inspect --root path/to/class_folders --json
    plankton diffusion sample --checkpoint last.ckpt --n 64 --out grid.png
    plankton features layers --checkpoint last.ckpt
    plankton features cluster --config configs/probe_diffusion.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from datamodules import PlanktonDataModule, SyntheticPlankton
from datamodules.synthetic import DOMAINS, write_dataset
from lightning_modules import DiffusionModule, load_diffusion
from lightning_modules.common.figures import save_grid
from workflows.classify import classify_folder
from workflows.clustering import cluster_features
from workflows.experiment import STAGES, Experiment, ExperimentRunner
from workflows.lightning_cli import PlanktonCLI, datamodule_from_config, model_settings_from_config
from workflows.report import build_report


def _parser(command: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"plankton {command}", description=COMMANDS[command][0])


def data_command(argv: list[str]) -> int:
    parser = _parser("data")
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
    parser = _parser("diffusion")
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
    parser = _parser("features")
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
    best = cluster_features(args.config, args.out, args.split, args.k, args.seed, overrides)
    where = best["layer"] + (f" t={best['timestep']}" if best["timestep"] != "" else "")
    print(f"wrote {Path(args.out) / 'clustering.csv'}; best NMI {best['nmi']:.3f} at {where}")
    return 0


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
    parser = _parser("experiment")
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
    parser = _parser("report")
    parser.add_argument("run_dir", help="the --out folder of plankton experiment")
    print(f"wrote {build_report(parser.parse_args(argv).run_dir)}")
    return 0


def classify_command(argv: list[str]) -> int:
    parser = _parser("classify")
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


# The suite's own commands: what each does, and its handler (its arguments after the name).
COMMANDS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "data": ("synthesise or inspect a dataset", data_command),
    "diffusion": ("sample images from a diffusion checkpoint", diffusion_command),
    "features": (
        "list the U-Net blocks, or cluster frozen features at every key",
        features_command,
    ),
    "experiment": (
        "run the whole protocol (data, pretraining, probes, clustering, report)",
        experiment_command,
    ),
    "report": ("rebuild an experiment's report from its run folder", report_command),
    "classify": (
        "classify a folder of new images: top-k labels and an abundance table",
        classify_command,
    ),
}


def main(argv: list[str] | None = None) -> int:
    from_console = argv is None
    argv = sys.argv[1:] if from_console else list(argv)
    if argv and argv[0] in COMMANDS:
        # Suite commands build Lightning CLIs from their own arguments, not from sys.argv.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            return COMMANDS[argv[0]][1](argv[1:])
        except (OSError, ValueError) as error:  # bad paths, settings or disk space
            print(f"error: {error}", file=sys.stderr)
            return 2
    if argv and argv[0] in ("-h", "--help"):
        print("Suite commands:\n" + "\n".join(f"  {k:<10} {v}" for k, (v, _) in COMMANDS.items()))
        print("\nLightning commands (fit, validate, test, predict):\n")
    PlanktonCLI(args=None if from_console else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
