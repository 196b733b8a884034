"""The ``plankton`` command: argument parsing and printing only. Lightning's
``fit``/``validate``/``test``/``predict`` plus the suite's own commands (``COMMANDS``); the work is
done in ``workflows`` and below, and nothing imports this file.

    plankton fit --config configs/diffusion.yaml
    plankton data synth --out data/synthetic --classes 12 --per-class 300
    plankton data inspect --root path/to/class_folders --json
    plankton diffusion sample --checkpoint last.ckpt --n 64 --out grid.png
    plankton features layers --checkpoint last.ckpt
    plankton features cluster --config configs/probe_diffusion.yaml

A mistake (a missing file, a bad setting, a folder that cannot be written) prints one line,
``error: ...``, and exits with status 2; ``--print_traceback`` or ``PLANKTON_TRACEBACK=1`` shows
the whole traceback instead, for a bug report.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from datamodules import PlanktonDataModule, SyntheticPlankton
from datamodules.cache import default_cache_dir
from datamodules.synthetic import DOMAINS, prior_shift_size, write_dataset
from lightning_modules import DiffusionModule, load_diffusion
from lightning_modules.common.figures import save_grid
from workflows.caches import clean_caches, list_caches
from workflows.classify import ESTIMATORS, classify_folder
from workflows.classify_survey import SurveyResult, classify_samples
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
    synth.add_argument(
        "--temporal-prior-shift",
        type=float,
        default=defaults.temporal_prior_shift,
        help="how far the temporal set's class priors move from the source's, from 0 (the same) "
        "to 1 (the most common classes rotated away)",
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
            temporal_prior_shift=args.temporal_prior_shift,
            seed=args.seed,
        )
        manifest = write_dataset(spec, args.out)
        shift = (
            f"; temporal class-prior shift {prior_shift_size(spec):.3f} (half L1 from the source)"
            if "temporal" in spec.domains
            else ""
        )
        print(f"wrote {manifest}{shift}")
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
        ("images left out by max_class_images", "capped"),
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
    runner = ExperimentRunner(experiment, out)
    report = runner.run(force=args.force)
    if runner.processes.is_zero:
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
    inputs = parser.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--images", help="a folder of images (subfolders too): one sample")
    inputs.add_argument(
        "--samples", help="a folder whose subfolders are the samples, or a CSV manifest with "
        "the columns sample_id,path",
    )  # fmt: skip
    parser.add_argument(
        "--out", default="predictions.csv",
        help="CSV of the predictions (the other outputs are named after it); with --samples, "
        "also a folder",
    )  # fmt: skip
    parser.add_argument("--top-k", type=int, default=3, help="labels per image")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--abundance", default="cc", help=f"estimators of the class fractions, comma-separated: "
        f"{', '.join(ESTIMATORS)} or all (all but cc correct for a change of class fractions and "
        "need a calibrated checkpoint)",
    )  # fmt: skip
    parser.add_argument(
        "--reject", action="store_true",
        help="label images below the checkpoint's confidence threshold 'unknown', not a class",
    )  # fmt: skip
    parser.add_argument(
        "--ecotaxa", action="store_true",
        help="also write ecotaxa_<out stem>.tsv, an EcoTaxa import table, in the image folder",
    )  # fmt: skip
    parser.add_argument(
        "--n-boot", type=int, default=200, help="bootstrap resamples of the abundance intervals"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --out and the files written with it"
    )
    args = parser.parse_args(argv)
    options = {
        "top_k": args.top_k, "batch_size": args.batch_size, "overwrite": args.overwrite,
        "abundance": args.abundance, "reject": args.reject, "ecotaxa": args.ecotaxa,
        "n_boot": args.n_boot,
    }  # fmt: skip
    if args.samples:
        return _print_survey(classify_samples(args.checkpoint, args.samples, args.out, **options))
    summary = classify_folder(args.checkpoint, args.images, args.out, **options)
    outputs = summary.outputs
    temperature = summary.temperature
    probabilities = f"temperature {temperature:.3g}" if temperature else "uncalibrated"
    print(
        f"classified {summary.images} images on {summary.device} ({probabilities}): "
        f"{outputs.predictions}"
    )
    rejection = summary.rejection
    if rejection:
        print(
            f"{rejection['rejected']} images unknown: confidence below "
            f"{rejection['threshold']:.3f} (on validation: precision "
            f"{rejection['precision']:.3f}, coverage {rejection['coverage']:.3f})"
        )
    abundance = summary.abundance
    print(f"abundance table (fractions of the accepted images): {outputs.counts}")
    rows = list(summary.counts.items())[:10]
    width = max(len("class"), *(len(name) for name, _ in rows))
    print(f"  {'class':<{width}} {'top-1':>6}" + "".join(f"{name:>8}" for name in abundance))
    for name, count in rows:
        fractions = "".join(f"{estimates[name]:>8.3f}" for estimates in abundance.values())
        print(f"  {name:<{width}} {count:>6}{fractions}")
    if outputs.ecotaxa:
        print(f"EcoTaxa import table: {outputs.ecotaxa}")
    if summary.skipped:
        print(f"{summary.skipped} unreadable files listed in {outputs.skipped}")
    print(f"provenance: {outputs.provenance}")
    return 0


def _print_survey(survey: SurveyResult) -> int:
    """Print what a survey (``classify --samples``) classified and wrote."""
    outputs = survey.outputs
    images = sum(sample.images for sample in survey.samples)
    print(
        f"classified {images} images of {len(survey.samples)} samples on {survey.device}: "
        f"{outputs.predictions}"
    )
    for sample in survey.samples:
        if not sample.images:
            print(f"  sample {sample.sample_id}: no readable image (counted zero)")
    print(f"counts per sample: {outputs.counts}")
    for path in outputs.wide.values():
        print(f"  samples x classes: {path}")
    skipped = sum(sample.skipped for sample in survey.samples)
    print(f"unreadable files and empty samples: {outputs.skipped} ({skipped} files)")
    print(f"provenance: {outputs.provenance}")
    return 0


def cache_command(argv: list[str]) -> int:
    parser = _parser("cache")
    parser.add_argument("action", choices=["list", "clean"])
    parser.add_argument("--cache-dir", help="default: $PLANKTON_CACHE, else ~/.cache/plankton")
    parser.add_argument("--dry-run", action="store_true", help="clean: list, remove nothing")
    parser.add_argument(
        "--unused-for", type=float, default=0.0, help="clean: only caches unused for DAYS"
    )
    args = parser.parse_args(argv)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    if args.action == "list":
        entries = list_caches(cache_dir)
        for e in entries:
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
            holders = f"in use by {', '.join(e.used_by)}" if e.used_by else "unused"
            print(f"{e.kind:8} {e.size / 2**20:9.1f} MiB  {used}  {holders}  {e.state}  "
                  f"{e.description}")  # fmt: skip
        total = sum(e.size for e in entries)
        print(f"{len(entries)} caches, {total / 2**20:.1f} MiB in {cache_dir}")
        return 0
    removals = clean_caches(cache_dir, args.dry_run, args.unused_for)
    verb = "would remove" if args.dry_run else "removed"
    for removal in removals:
        print(f"{verb} {removal.path} ({removal.size / 2**20:.1f} MiB): {removal.reason}")
    freed = sum(r.size for r in removals) / 2**20
    print(f"{len(removals)} files, {freed:.1f} MiB {'would be ' if args.dry_run else ''}freed")
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
    "cache": ("list the caches, or clean those no running process uses", cache_command),
}


# Lightning's commands: what each does (their options come from LightningCLI).
LIGHTNING_COMMANDS = {
    "fit": "train a model: plankton fit --config configs/diffusion.yaml",
    "validate": "score a checkpoint on the validation split (--ckpt_path)",
    "test": "score a checkpoint on the test split and every OOD set (--ckpt_path)",
    "predict": "class probabilities of a checkpoint on data.predict_set (--ckpt_path)",
}
# Errors of the user's making (a path, a setting, a file that is no checkpoint, a folder that
# cannot be written): one line, not a traceback. Anything else is a bug and keeps its traceback.
# Lightning's MisconfigurationException is a setting it refuses (a resume to fewer epochs than the
# checkpoint's, say): the user's to change.
USER_ERRORS = (OSError, ValueError, pickle.UnpicklingError, MisconfigurationException)


def command_list() -> str:
    """Every command of ``plankton`` with what it does, for a bare ``plankton`` and ``--help``."""
    rows = [f"  {k:<10} {v}" for k, v in LIGHTNING_COMMANDS.items()]
    suite = [f"  {k:<10} {v}" for k, (v, _) in COMMANDS.items()]
    return "\n".join(
        ["usage: plankton COMMAND [options]", "", "Lightning commands:", *rows, "",
         "Suite commands:", *suite, "", "plankton COMMAND --help lists a command's options; "
         "--print_traceback (or PLANKTON_TRACEBACK=1) shows a failure's whole traceback."]
    )  # fmt: skip


def user_error(error: BaseException) -> str | None:
    """The one-line message of a user error, or None for a bug. Settings are instantiated by
    jsonargparse, which wraps a constructor's error in a ValueError of its own: the root cause
    of a chain of user errors is reported."""
    while isinstance(error, USER_ERRORS) and error.__cause__ is not None:
        error = error.__cause__
    if not isinstance(error, USER_ERRORS):
        return None
    if isinstance(error, OSError) and error.filename and error.strerror:
        hint = ""
        if isinstance(error, PermissionError):
            hint = ": check its permissions, or write elsewhere (--trainer.default_root_dir, --out)"
        elif error.errno in (errno.ENOSPC, errno.EROFS):
            hint = (": free space there, or write elsewhere (--trainer.default_root_dir, --out, "
                    "PLANKTON_CACHE or data.cache_dir for caches)")  # fmt: skip
        return f"{error.filename}: {error.strerror}{hint}"
    return str(error)


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user error (``USER_ERRORS``) prints one ``error:`` line and returns 2,
    unless ``--print_traceback`` or ``PLANKTON_TRACEBACK=1`` asks for the traceback. Parse errors
    keep jsonargparse's and argparse's usage message and exit status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    traceback = "--print_traceback" in argv or os.environ.get("PLANKTON_TRACEBACK") == "1"
    argv = [arg for arg in argv if arg != "--print_traceback"]
    if not argv:
        print(command_list(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(command_list() + "\n\nLightning's options:\n")
    # Commands build Lightning CLIs from the arguments given here, not from sys.argv.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    try:
        if argv[0] in COMMANDS:
            return COMMANDS[argv[0]][1](argv[1:])
        PlanktonCLI(args=argv)
    except Exception as error:
        message = None if traceback else user_error(error)
        if message is None:
            raise
        if rank_zero_only.rank == 0:  # under DDP every rank fails alike: one line, not one each
            print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
