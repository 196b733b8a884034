"""The suite on one CUDA GPU in under 8 minutes, as one table: every registered method's training
throughput and MFU, our U-Net against diffusers', the device-resident data path against the disk
cache, and a short experiment end to end.

Each step runs in a process of its own under its own timeout (the timeouts add up to under 8
minutes, and none may outlast what is left of them), so that a step that fails, hangs or leaves
the GPU in a bad state costs only its own row:

- ``throughput demo`` and ``throughput paper``: ``training_throughput.py --size demo|paper``,
  training images per second of every method built from its own config (bf16-mixed) and its MFU
  (training FLOPs per image times images per second over the GPU's dense peak, ``harness.py``'s
  ``PEAK_TFLOPS``), with each method's ratio to the supervised baseline.
- ``diffusers bf16 paper``: ``diffusion_throughput.py --precision bf16-mixed --size paper``,
  training images per second of our U-Net against diffusers' ``UNet2DModel`` of the same layout
  and parameter count, their ratio, and our MFU.
- ``data path``: training batches (128 images) of the demo's synthetic set at 64 px through
  SimCLR's two augmented views (the heaviest of the suite's views), on the GPU, two ways: the
  split held in GPU memory (``resident_fraction`` 0.25: each batch an index into it, augmented
  there) against the same split read from the disk cache (``resident_fraction`` 0: workers read
  and augment each batch, pinned memory, a copy to the GPU). Images per second of each, the
  median of 10 epochs after a warm-up one, and their ratio.
- ``experiment smoke``: ``plankton experiment`` on ``configs/experiments/smoke.yaml`` with the
  trainer on the GPU (``precision: auto``, so bf16-mixed): its wall time, each stage's, and
  whether ``report.md`` was written.

A failed step shows as ``FAILED`` with its one-line reason, and the script then exits 1. Without
CUDA it refuses (exit status 2); ``--dry-run`` walks the same steps on the CPU at toy sizes (each
benchmark's ``--quick`` mode, batches of 8 at the demo size and of 2 at the paper's, diffusers at
the demo size, the data path at 16 px, the smoke experiment as it is): it proves the plumbing,
not the GPU, and its figures mean nothing.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from harness import CONFIGS, argument_parser, print_figures, work_dir
from torch.utils.data import DataLoader

BENCHMARKS = Path(__file__).resolve().parent
REPOSITORY = BENCHMARKS.parent
SMOKE = CONFIGS / "experiments" / "smoke.yaml"
# No step on a GPU runs past this many seconds from the start: 8 minutes less 20 s for this
# script's own start and its table.
BUDGET_S = 460
# Each step's timeout on a GPU, estimated (see docs/gpu_check.md); they add up to BUDGET_S or
# less, so each step gets all of its own.
GPU_TIMEOUTS = {
    "throughput demo": 95,
    "throughput paper": 110,
    "diffusers bf16 paper": 60,
    "data path": 45,
    "experiment smoke": 140,
}
# On the CPU of --dry-run: generous, since only the plumbing is under test.
DRY_RUN_TIMEOUTS = {
    "throughput demo": 360,
    "throughput paper": 480,
    "diffusers bf16 paper": 240,
    "data path": 120,
    "experiment smoke": 900,
}
DRY_RUN_BUDGET_S = sum(DRY_RUN_TIMEOUTS.values())
REFUSAL = (
    "error: gpu-check needs a CUDA GPU (torch.cuda.is_available() is False); "
    "use --dry-run to walk the steps on the CPU at toy sizes"
)


@dataclass
class Step:
    """A command run in a fresh process, and how its figures are read once it exits 0, from its
    stdout and wall time: by default its last ``key=value`` line (``harness.print_figures``)."""

    name: str
    command: list[str]
    timeout: float
    figures: Callable[[str, float], dict[str, str]] = field(
        default=lambda output, seconds: last_figures(output)
    )


@dataclass
class Outcome:
    step: Step
    seconds: float
    figures: dict[str, str]
    failure: str | None = None


def last_figures(output: str) -> dict[str, str]:
    """The last line of ``output`` made only of ``key=value`` pairs, as a dict."""
    for line in reversed(output.splitlines()):
        pairs = line.split()
        if pairs and all("=" in pair and not pair.startswith("=") for pair in pairs):
            return dict(pair.split("=", 1) for pair in pairs)
    raise ValueError("no key=value figure line in its output")


def one_line(text: str, limit: int = 160) -> str:
    """The last non-empty line of ``text`` (where a traceback says what went wrong), shortened."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[-1] if lines else "no output"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def shown(command: list[str]) -> str:
    """``command`` as a progress line shows it: this Python as ``python``, paths in the
    repository relative to it."""
    words = ["python" if word == sys.executable else word for word in command]
    return " ".join(word.replace(f"{REPOSITORY}{os.sep}", "") for word in words)


def run_step(step: Step, logs: Path, left: float, env: dict[str, str]) -> Outcome:
    """Run ``step`` for at most its timeout or ``left`` seconds, whichever is less; its stdout
    and stderr go to ``logs``. On a timeout its whole process group (DataLoader workers too) is
    killed."""
    timeout = min(step.timeout, left)
    if timeout < 5:
        return Outcome(step, 0.0, {}, "not started: the time budget was spent")
    stem = logs / step.name.replace(" ", "_")
    out_path, err_path = stem.with_suffix(".out"), stem.with_suffix(".err")
    print(f"[{step.name}] {shown(step.command)} (timeout {timeout:.0f} s)", file=sys.stderr)
    started = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        process = subprocess.Popen(
            step.command, stdout=out, stderr=err, cwd=REPOSITORY, env=env, start_new_session=True
        )
        try:
            status = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = None
    seconds = time.perf_counter() - started
    output, errors = out_path.read_text(), err_path.read_text()
    failure = None
    if status is None:
        failure = f"timed out after {timeout:.0f} s"
    elif status != 0:
        failure = f"exit status {status}: {one_line(errors or output)}"
    figures: dict[str, str] = {}
    if failure is None:
        try:
            figures = step.figures(output, seconds)
        except (ValueError, OSError) as error:
            failure = str(error)
    if failure is None:
        print(f"[{step.name}] ok in {seconds:.1f} s", file=sys.stderr)
    else:
        tail = "\n".join((errors or output).splitlines()[-15:])
        print(f"[{step.name}] FAILED in {seconds:.1f} s: {failure}\n{tail}", file=sys.stderr)
    return Outcome(step, seconds, figures, failure)


def experiment_config(folder: Path, dry_run: bool) -> Path:
    """``smoke.yaml`` with its config paths made absolute (an experiment's paths are relative to
    its file) and the trainer on the GPU, written into ``folder``. For ``dry_run`` the trainer is
    on the CPU, and one regime and one extra readout are kept (every stage still runs), which
    halves the smoke's many short runs."""
    from workflows.experiment_config import settings_with_absolute_paths

    settings = settings_with_absolute_paths(SMOKE)
    trainer = settings.setdefault("trainer_overrides", {})
    if dry_run:
        trainer.update(accelerator="cpu", devices=1)
        settings["regimes"] = [settings.get("pretrain_regime", "long_tailed")]
        readouts = settings["probes"].get("readouts") or {}
        settings["probes"]["readouts"] = dict(list(readouts.items())[:1])
    else:  # the GPU's default precision, as a user's run there gets it
        trainer.update(accelerator="gpu", devices=1, precision="auto")
    import yaml

    path = folder / "gpu_smoke.yaml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def experiment_figures(out: Path) -> Callable[[str, float], dict[str, str]]:
    """The experiment's wall time, each stage's (from its ``done.json``) and whether
    ``report.md`` was written in ``out``."""

    def figures(output: str, seconds: float) -> dict[str, str]:
        report = out / "report.md"
        if not report.is_file() or report.stat().st_size == 0:
            raise ValueError(f"no report: {report.name} missing or empty in the run folder")
        result = {"experiment_s": f"{seconds:.1f}"}
        for marker in sorted(out.glob("*/done.json"), key=lambda p: p.stat().st_mtime):
            result[f"{marker.parent.name}_s"] = f"{json.loads(marker.read_text())['wall_s']:.1f}"
        result["report"] = f"written ({report.stat().st_size:,} bytes)"
        return result

    return figures


def steps(root: Path, dry_run: bool, quick: bool) -> list[Step]:
    """The check's steps, sized for a GPU, or toy-sized on the CPU for ``dry_run``."""
    python, data = sys.executable, str(root / "data")
    timeouts = DRY_RUN_TIMEOUTS if dry_run else GPU_TIMEOUTS
    fast = ["--quick"] if quick or dry_run else []
    throughput = [python, str(BENCHMARKS / "training_throughput.py"), *fast, "--cache-dir", data]
    demo_batch = ["--batch-size", "8"] if dry_run else []
    paper_batch = ["--batch-size", "2"] if dry_run else []
    # The paper U-Net's step is 141 GFLOP an image: minutes on 2 CPU cores even at batch 2, so
    # the dry run compares the demo's U-Net.
    diffusers = [python, str(BENCHMARKS / "diffusion_throughput.py"), *fast,
                 "--precision", "bf16-mixed", "--size", "demo" if dry_run else "paper",
                 "--device", "cpu" if dry_run else "cuda", *paper_batch]  # fmt: skip
    data_path = [python, str(Path(__file__).resolve()), "--data-path", *fast, "--cache-dir", data]
    if dry_run:
        data_path.append("--dry-run")
    out = root / "experiment"
    plankton = Path(python).with_name("plankton")
    experiment = [
        *([str(plankton)] if plankton.is_file() else [python, "-c", "import cli; cli.main()"]),
        "experiment", "--config", str(experiment_config(root, dry_run)), "--out", str(out),
    ]  # fmt: skip
    return [
        Step("throughput demo", [*throughput, "--size", "demo", *demo_batch],
             timeouts["throughput demo"]),
        Step("throughput paper", [*throughput, "--size", "paper", *paper_batch],
             timeouts["throughput paper"]),
        Step("diffusers bf16 demo" if dry_run else "diffusers bf16 paper", diffusers,
             timeouts["diffusers bf16 paper"]),
        Step("data path", data_path, timeouts["data path"]),
        Step("experiment smoke", experiment, timeouts["experiment smoke"],
             experiment_figures(out)),
    ]  # fmt: skip


def print_table(outcomes: list[Outcome]) -> None:
    """One Markdown table: a row per figure, each step's name, status and seconds on its first."""
    rows = [("step", "status", "s", "figure", "value")]
    for outcome in outcomes:
        head = (
            outcome.step.name,
            "FAILED" if outcome.failure else "ok",
            f"{outcome.seconds:.1f}",
        )
        figures = [("reason", outcome.failure)] if outcome.failure else outcome.figures.items()
        for index, (key, value) in enumerate(figures):
            rows.append((*(head if index == 0 else ("", "", "")), key, value or "-"))
        if not figures:
            rows.append((*head, "-", "-"))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]

    def line(cells: tuple[str, ...]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    print(line(rows[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows[1:]:
        print(line(row))


# -- the data path step, run by this script in a process of its own --------------------------
def to_device(views: torch.Tensor | list[torch.Tensor], device: torch.device) -> list:
    views = views if isinstance(views, list) else [views]
    return [view.to(device, non_blocking=True) for view in views]


def epoch_rate(loader: DataLoader, device: torch.device) -> float:
    """Images per second of one epoch of ``loader``, its batches on ``device`` at the end."""
    started, count = time.perf_counter(), 0
    for views, labels, _ in loader:
        to_device(views, device)
        count += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count / (time.perf_counter() - started)


def data_path(cache_dir: Path, dry_run: bool, quick: bool) -> None:
    """Print the figures of the data path: the training split resident on the device against
    read from the disk cache, through SimCLR's views, on the GPU (the CPU for ``dry_run``)."""
    from datamodules import PlanktonDataModule
    from lightning_modules.baselines.simclr import simclr_view

    device = torch.device("cpu" if dry_run else "cuda")
    # 64 px and the paper's batch; the demo's split is 1,021 images, a few batches an epoch.
    side, batch = (16, 16) if dry_run else (64, 128)
    epochs = 2 if dry_run or quick else 10  # timed epochs, after one that is not
    workers = min(8, max(1, (os.cpu_count() or 2) // 2))
    rates = {}
    for path, fraction in (("resident", 0.25), ("streamed", 0.0)):
        # The demo's synthetic set and training split (configs/data/synthetic.yaml, generated
        # by the throughput steps into the same folder); the second DataModule reads the cache
        # the first one built.
        data = PlanktonDataModule(
            image_size=side, batch_size=batch, cache_dir=str(cache_dir), num_workers=workers,
            resident_fraction=fraction, progress=False,
        )  # fmt: skip
        view = simclr_view(side, data.channels)
        dataset = data.dataset("train", view, device)
        if dataset.resident != (fraction > 0):
            raise RuntimeError(f"the {path} path was not taken: resident={dataset.resident}")
        streamed_workers = 0 if dataset.resident else workers
        loader = dataset.loader(
            batch,
            shuffle=True,
            drop_last=True,
            num_workers=streamed_workers,
            persistent_workers=streamed_workers > 0,
            pin_memory=not dataset.resident and device.type == "cuda",
        )
        epoch_rate(loader, device)  # warm-up: worker start, cuDNN, the allocator
        rates[path] = statistics.median(epoch_rate(loader, device) for _ in range(epochs))
    print(
        f"train split of {len(dataset)} images at {side} px, SimCLR views, batches of {batch}, "
        f"on {device}; streamed with {workers} workers; median of {epochs} epochs"
    )
    print_figures(
        images=len(dataset),
        resident_img_per_s=round(rates["resident"]),
        streamed_img_per_s=round(rates["streamed"]),
        resident_vs_streamed=round(rates["resident"] / rates["streamed"], 2),
    )


def main() -> int:
    parser = argument_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="the same steps on the CPU at toy sizes (a few minutes on 2 cores): the plumbing",
    )
    parser.add_argument(
        "--data-path",
        action="store_true",
        help="measure only the data path and print its figures (the step run in its own process)",
    )
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print(REFUSAL, file=sys.stderr)
        return 2
    if args.data_path:
        with work_dir(args.cache_dir) as root:
            data_path(root, args.dry_run, args.quick)
        return 0

    budget = DRY_RUN_BUDGET_S if args.dry_run else BUDGET_S
    deadline = time.perf_counter() + budget
    where = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(0)
    env = dict(os.environ)
    with work_dir(args.cache_dir) as root:
        # Generated data and caches of every step in the work folder, none in the user's cache.
        env["PLANKTON_CACHE"] = str(root / "data")
        logs = root / "logs"
        logs.mkdir(exist_ok=True)
        started = time.perf_counter()
        outcomes = [
            run_step(step, logs, deadline - time.perf_counter(), env)
            for step in steps(root, args.dry_run, args.quick)
        ]
        total = time.perf_counter() - started
        if args.cache_dir is not None:
            print(f"logs of each step in {logs}", file=sys.stderr)
    print(f"gpu-check on {where}, {total:.0f} s in all (budget {budget} s)")
    print_table(outcomes)
    failed = [outcome.step.name for outcome in outcomes if outcome.failure]
    print_figures(steps=len(outcomes), failed=len(failed), total_s=round(total, 1))
    if failed:
        print(f"error: {len(failed)} step(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
