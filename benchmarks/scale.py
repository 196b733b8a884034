"""Time and memory of scanning, caching and extracting features as the image count grows.

For two sizes (default 50,000 and 200,000 images; ``--quick`` 5,000 and 20,000) a balanced
synthetic set of 16 px class folders is generated (timed apart: it is not one of the measured
phases), then each phase runs in a fresh process, so that its peak memory is its own:

1. scan: ``sources.scan`` of the class folders;
2. image cache: ``cache.load_or_build`` of the scanned records (the scan is done first, untimed);
3. features: ``feature_cache.load_or_extract`` of every cached image with a small untrained
   diffusion U-Net (every block, two timesteps), the extraction a probe runs.

Each phase is timed, and its process's memory is read from ``/proc/<pid>/status`` every few
milliseconds (and its exact peak from ``wait4``), against a baseline process that imports the
same modules and does nothing. Resident memory is reported in two parts, since they mean
different things:

- anonymous (``RssAnon``): the heap, what the process really needs. It may grow with the image
  count only by what the phase legitimately holds: the scanned records, and the features that
  ``load_or_extract`` returns in memory. Anything beyond that (decoded images in a list, an
  array concatenated in RAM) shows as an excess that grows with the count;
- file-backed (``RssFile``): pages of the memory-mapped caches the phase wrote or read. They
  count in the resident size, but they are page cache the kernel can drop and read again, and
  they are the arrays themselves: the image cache (1 byte a pixel) and the feature cache
  (2 bytes a feature, mapped when written and again when read back).

Flat memory means: time grows as the count (large/small time ratio near the size ratio) and the
anonymous excess over what the phase holds stays the same at both sizes. The synthetic set and
the caches go in a temporary folder, or in ``--cache-dir`` (where the set is kept for the next
run; the caches are rebuilt every run, so that their building is timed). Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import argument_parser, print_figures, work_dir

from datamodules.cache import load_or_build
from datamodules.datamodule import PlanktonImages
from datamodules.preprocessing import Preprocessing
from datamodules.sources import scan
from datamodules.synthetic import SyntheticPlankton, ensure_dataset
from datamodules.views import eval_view
from lightning_modules.diffusion.noise_schedule import NoiseSchedule
from lightning_modules.diffusion.unet import UNet
from lightning_modules.probes.feature_cache import load_or_extract
from lightning_modules.probes.features import DiffusionFeatures

SIZES, QUICK_SIZES = (50_000, 200_000), (5_000, 20_000)
CLASSES, IMAGE_SIZE = 20, 16
PHASES = ("scan", "cache", "features")
EXTRACT_BATCH = 256
SAMPLE_S = 0.01  # how often the parent reads a phase's memory
MIB = 2**20


def status_bytes(pid: int | str = "self") -> dict[str, int]:
    """``VmRSS``, ``RssAnon`` and ``RssFile`` of a process in bytes (empty once it has exited)."""
    figures = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "RssAnon", "RssFile"):
                    figures[name] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return figures


def feature_source() -> DiffusionFeatures:
    """A U-Net of the probes' kind, small enough for 2 CPU cores, every block at two timesteps.
    Untrained: its features mean nothing, but they cost what trained ones cost."""
    torch.manual_seed(0)
    unet = UNet(
        image_size=IMAGE_SIZE, base_channels=8, channel_mult=(1, 2), attention_resolutions=()
    )
    return DiffusionFeatures.from_unet(
        unet, NoiseSchedule(), layers=["*"], timesteps=[10, 100], micro_batch=64
    )


def run_phase(phase: str, data: Path, caches: Path, count: int) -> dict:
    """One phase in this (fresh) process: its seconds, what it legitimately holds in anonymous
    memory and in memory-mapped arrays, and this process's memory before it began."""
    settings = Preprocessing(image_size=IMAGE_SIZE)
    before = status_bytes()
    if phase == "baseline":
        return {"before": before}
    if phase == "scan":
        start = time.perf_counter()
        records = scan(data).records
        seconds = time.perf_counter() - start
        # The scan's output: every record, held until the process ends.
        held = status_bytes()["RssAnon"] - before["RssAnon"]
        return {"seconds": seconds, "count": len(records), "held": held, "mapped": 0}
    if phase == "cache":
        records = scan(data).records
        held = status_bytes()["RssAnon"] - before["RssAnon"]  # the records, its input
        start = time.perf_counter()
        cached = load_or_build(records, settings, caches, str(data), progress=False)
        seconds = time.perf_counter() - start
        return {
            "seconds": seconds,
            "count": len(records),
            "held": held + cached.readable.nbytes,
            "mapped": cached.images.nbytes,  # written through its memory map
        }
    source = feature_source()
    source.bind_data(1, IMAGE_SIZE)
    width = sum(source.feature_dims().values())
    rows = np.arange(count)
    labels = np.repeat(np.arange(CLASSES), count // CLASSES)
    # The image cache the previous phase built, the only one in this run's folder.
    cache = next((caches / "images").rglob("*.npy"))
    images = PlanktonImages(cache, rows, labels, eval_view(IMAGE_SIZE, 1))
    start = time.perf_counter()
    features = load_or_extract(source, images, caches, EXTRACT_BATCH, progress=False)
    seconds = time.perf_counter() - start
    returned = sum(f.numel() * f.element_size() for f in features.values())
    return {
        "seconds": seconds,
        "count": count,
        # The returned features (a copy in memory), and the rows and labels of the split.
        "held": returned + rows.nbytes + labels.nbytes,
        # Every image read through the cache's map; the feature cache written through one map
        # and read back through another.
        "mapped": count * IMAGE_SIZE**2 + 2 * count * width * 2,
        "width": width,
    }


def measure(phase: str, data: Path, caches: Path, count: int) -> dict:
    """Run ``phase`` in a fresh process of this script; its result with its peak resident size
    (exact, from ``wait4``) and its peaks of anonymous and file-backed memory (sampled)."""
    result_file = caches / f"{phase}.json"
    command = [sys.executable, __file__, "--phase", phase, "--data", str(data)]
    command += ["--caches", str(caches), "--count", str(count), "--result", str(result_file)]
    process = subprocess.Popen(command)
    peaks = {"RssAnon": 0, "RssFile": 0}
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        for name, value in status_bytes(process.pid).items():
            peaks[name] = max(peaks.get(name, 0), value)
        time.sleep(SAMPLE_S)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"phase {phase} at {count} images failed (exit {process.returncode})")
    result = json.loads(result_file.read_text())
    result_file.unlink()
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    return {**result, "peak": peak, "anon": peaks["RssAnon"], "file": peaks["RssFile"]}


def dataset(root: Path, count: int) -> tuple[Path, int]:
    """The class folders of a balanced synthetic set of about ``count`` images (generated on
    first use) and its exact image count."""
    per_class = math.ceil(count / CLASSES)
    spec = SyntheticPlankton(
        classes=CLASSES, per_class=per_class, imbalance=1.0, size=IMAGE_SIZE, domains=["source"]
    )
    start = time.perf_counter()
    manifest = ensure_dataset(spec, root, progress=False)
    seconds = time.perf_counter() - start
    total = CLASSES * per_class
    if seconds > 1:
        print(f"generated {total} images in {seconds:.0f} s ({total / seconds:.0f} img/s)")
    else:
        print(f"reused the generated set of {total} images in {manifest.parent}")
    return manifest.parent, total


def child(args: argparse.Namespace) -> None:
    result = run_phase(args.phase, args.data, args.caches, args.count)
    args.result.write_text(json.dumps(result))


def main() -> None:
    parser = argument_parser("Time and peak memory of scan, cache and extraction at two sizes.")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs=2,
        metavar=("SMALL", "LARGE"),
        help=f"image counts (default {SIZES[0]} {SIZES[1]}; --quick {QUICK_SIZES[0]} "
        f"{QUICK_SIZES[1]}), rounded up to a multiple of {CLASSES} classes",
    )
    # How the parent starts each phase in a fresh process of this script.
    for name in ("phase", "data", "caches", "count", "result"):
        kind = {"count": int, "phase": str}.get(name, Path)
        parser.add_argument(f"--{name}", type=kind, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase is not None:
        child(args)
        return

    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    results: dict[int, dict[str, dict]] = {}
    with work_dir(args.cache_dir) as root:
        for size in sizes:
            data, count = dataset(root, size)
            with tempfile.TemporaryDirectory(dir=root) as folder:
                caches = Path(folder)
                runs = {"baseline": measure("baseline", data, caches, count)}
                for phase in PHASES:
                    runs[phase] = measure(phase, data, caches, count)
            results[count] = runs
            report(count, runs)
    small, large = sorted(results)
    figures = {"small": small, "large": large, "size_ratio": round(large / small, 2)}
    print(f"\nlarge/small ({large} / {small} images = {large / small:.2f}x):")
    for phase in PHASES:
        a, b = results[small][phase], results[large][phase]
        time_ratio = b["seconds"] / a["seconds"]
        growth = [growth_over_baseline(results[n], phase) for n in (small, large)]
        excess = [anon_excess(results[n], phase) for n in (small, large)]
        print(
            f"  {phase:8} time {time_ratio:5.2f}x, peak RSS over baseline "
            f"{growth[1] / growth[0]:5.2f}x ({growth[0] / MIB:.1f} -> {growth[1] / MIB:.1f} MiB), "
            f"anonymous beyond what it holds {excess[0] / MIB:.1f} -> {excess[1] / MIB:.1f} MiB"
        )
        figures[f"{phase}_time_ratio"] = round(time_ratio, 2)
        figures[f"{phase}_rss_ratio"] = round(growth[1] / growth[0], 2)
        figures[f"{phase}_excess_mib"] = f"{excess[0] / MIB:.1f}/{excess[1] / MIB:.1f}"
    print_figures(**figures)


def growth_over_baseline(runs: dict, phase: str) -> int:
    return runs[phase]["peak"] - runs["baseline"]["peak"]


def anon_excess(runs: dict, phase: str) -> int:
    """Peak anonymous memory beyond the baseline's and beyond what the phase holds."""
    return runs[phase]["anon"] - runs["baseline"]["anon"] - runs[phase]["held"]


def report(count: int, runs: dict) -> None:
    base = runs["baseline"]
    print(
        f"{count} images at {IMAGE_SIZE} px; baseline process (the same imports): peak "
        f"{base['peak'] / MIB:.0f} MiB, anonymous {base['anon'] / MIB:.0f} MiB, "
        f"file-backed {base['file'] / MIB:.0f} MiB"
    )
    print("  phase       seconds     img/s  peak MiB  +anon MiB  holds MiB  +file MiB  mapped MiB")
    for phase in PHASES:
        run = runs[phase]
        print(
            f"  {phase:8} {run['seconds']:10.2f} {count / run['seconds']:9.0f} "
            f"{run['peak'] / MIB:9.0f} {(run['anon'] - base['anon']) / MIB:10.1f} "
            f"{run['held'] / MIB:10.1f} {(run['file'] - base['file']) / MIB:10.1f} "
            f"{run['mapped'] / MIB:11.1f}"
        )


if __name__ == "__main__":
    main()
