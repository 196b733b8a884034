"""What `make demo` costs, from a run of the demo config at a small fraction of its size.

The demo config (``configs/experiments/demo.yaml``) runs end to end, every stage, with a fraction
``f`` of its synthetic images (``synthetic.per_class`` and ``max_per_class`` scaled by ``f``) and
of its pretraining epochs (diffusion and every baseline); the probes keep their epochs, since
their L-BFGS rounds do not shrink with the images. Each stage's time is then extrapolated to the
full demo:

- inside a pretraining run's ``fit``: by the training images seen at full size over those seen
  here (the epochs times the training set, both from the run's ``compute.json``);
- the rest of every stage (synthesis, feature extraction, probes, tests, clustering): by ``1/f``,
  the images;
- the report: as measured (it does not grow with the images).

Fixed costs (building models, starting trainers, writing checkpoints) are scaled up with the
rest, so the extrapolation errs high. ``--compare RUN`` (default ``runs/demo`` when it holds a
finished demo) prints beside each stage the real run's time and the extrapolation's error, so a
change that makes the demo slower shows here before anyone runs it whole.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml
from harness import CONFIGS, argument_parser, print_figures, work_dir

DEMO = CONFIGS / "experiments" / "demo.yaml"
PRETRAINING_STAGES = ("diffusion", "baselines")


def scaled_config(fraction: float, folder: Path, precision: str | None = None) -> Path:
    """The demo config with a fraction of its images and pretraining epochs, its paths made
    absolute so that it runs from ``folder``; ``precision`` replaces the shared ``auto``."""
    from workflows.experiment_config import settings_with_absolute_paths

    settings = settings_with_absolute_paths(DEMO)
    data = yaml.safe_load(Path(settings["data"]).read_text())
    synthetic = dict(data["synthetic"])
    synthetic["per_class"] = max(4, round(synthetic["per_class"] * fraction))
    overrides = dict(settings.get("data_overrides") or {})
    overrides["synthetic"] = synthetic | overrides.get("synthetic", {})
    overrides["max_per_class"] = max(2, round(data["max_per_class"] * fraction))
    overrides["progress"] = False
    settings["data_overrides"] = overrides
    trainer = dict(settings.get("trainer_overrides") or {})
    trainer |= {"enable_progress_bar": False, "enable_model_summary": False}
    if precision:
        trainer["precision"] = precision
    settings["trainer_overrides"] = trainer
    pretraining = [settings["diffusion"], *settings.get("baselines", {}).values()]
    for section in pretraining:
        section["max_epochs"] = max(1, round(section["max_epochs"] * fraction))
    path = folder / "demo_scaled.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def stage_times(out: Path) -> dict[str, float]:
    """The wall time of every finished stage of the experiment in ``out``, in the stages' order."""
    from workflows.layout import STAGES

    markers = {stage: out / stage / "done.json" for stage in STAGES}
    return {
        stage: json.loads(marker.read_text())["wall_s"]
        for stage, marker in markers.items()
        if marker.is_file()
    }


def extrapolate(out: Path, fraction: float) -> dict[str, float]:
    """Every stage's time at the demo's full size (see the module's docstring)."""
    demo = yaml.safe_load(DEMO.read_text())
    epochs = {"diffusion": demo["diffusion"]["max_epochs"]}
    epochs |= {name: run["max_epochs"] for name, run in (demo.get("baselines") or {}).items()}
    measured = stage_times(out)
    estimate = {}
    for stage, wall in measured.items():
        if stage == "report":
            estimate[stage] = wall
            continue
        inside_fit, full_fit = 0.0, 0.0
        if stage in PRETRAINING_STAGES:
            for compute in (out / "runs").glob("*/compute.json"):
                run = json.loads(compute.read_text())
                method = run["method"].removesuffix(f"_{run['regime']}")
                if (method == "diffusion") != (stage == "diffusion") or method not in epochs:
                    continue
                scale = epochs[method] / max(1, run["epochs"]) / fraction
                inside_fit += run["wall_s"]
                full_fit += run["wall_s"] * scale
        estimate[stage] = full_fit + (wall - inside_fit) / fraction
    return estimate


def main() -> None:
    parser = argument_parser(__doc__)
    parser.add_argument(
        "--fraction", type=float, help="of the images and epochs (default 0.2; --quick 0.1)"
    )
    parser.add_argument(
        "--precision",
        help="instead of the shared `auto`, e.g. 32-true: what a CPU without native bfloat16 runs",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        default=Path("runs/demo"),
        help="a finished `make demo` folder to compare with (default runs/demo, if finished)",
    )
    args = parser.parse_args()
    fraction = args.fraction if args.fraction is not None else (0.1 if args.quick else 0.2)
    if not 0 < fraction <= 1:
        parser.error(f"--fraction must be in (0, 1], got {fraction}")
    with work_dir(args.cache_dir) as folder:
        os.environ["PLANKTON_CACHE"] = str(folder / "cache")  # synthesis is part of the cost
        from workflows.experiment import Experiment, ExperimentRunner

        config = scaled_config(fraction, folder, args.precision)
        out = folder / "run"
        started = time.perf_counter()
        ExperimentRunner(Experiment.from_file(config), out, log=lambda message: None).run()
        wall = time.perf_counter() - started
        measured = stage_times(out)
        estimate = extrapolate(out, fraction)
    real = {}
    if (args.compare / "report" / "done.json").is_file():
        real = stage_times(args.compare)
    total = sum(estimate.values())
    print(f"{'stage':<12}{'here (s)':>10}{'full demo, est. (s)':>21}{'share':>8}{'real (s)':>10}")
    for stage, seconds in estimate.items():
        known = f"{real[stage]:.0f}" if stage in real else "-"
        share = seconds / total
        print(f"{stage:<12}{measured[stage]:>10.1f}{seconds:>21.0f}{share:>8.2f}{known:>10}")
    figures = {
        "fraction": fraction,
        "precision": args.precision or "auto",
        "wall_s": round(wall, 1),
        "extrapolated_s": round(total),
    }
    if real and not args.precision:
        real_total = sum(real.values())
        figures |= {
            "real_demo_s": round(real_total),
            "extrapolation_error": round(total / real_total - 1, 3),
        }
    else:
        figures |= {"real_demo_s": "", "extrapolation_error": ""}
    print_figures(**figures)


if __name__ == "__main__":
    main()
