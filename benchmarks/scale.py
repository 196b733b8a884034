"""Time and memory of scanning, caching and extracting features as the image count grows.

For two sizes (default 50,000 and 200,000 images; ``--quick`` 5,000 and 20,000) a balanced
synthetic set of 16 px class folders is generated (timed apart: it is not one of the measured
phases), then each phase runs in a fresh process, so that its peak memory is its own:

1. scan: ``sources.scan`` of the class folders;
2. image cache: ``cache.load_or_build`` of the scanned records (the scan is done first, untimed);
3. features: ``feature_cache.load_or_extract`` of every cached image with a small untrained
   diffusion U-Net (every block, two timesteps), the extraction a probe runs.

Each phase is timed, in wall and in CPU seconds (the second less sensitive to another job on a
shared machine), and its peak resident size is read exactly (``VmHWM``, restarted as the phase
begins, so that the imports' own peak does not hide it), against a baseline process that imports
the same modules and does nothing. Its memory is also read from ``/proc/<pid>/status`` every few
milliseconds in two parts, since they mean different things:

- anonymous (``RssAnon``): the heap, what the process really needs. It may grow with the image
  count only by what the phase legitimately holds: the scanned records, and the features that
  ``load_or_extract`` returns in memory. Anything beyond that (decoded images in a list, an
  array concatenated in RAM) shows as an excess that grows with the count;
- file-backed (``RssFile``): pages of the memory-mapped caches the phase wrote or read. They
  count in the resident size, but they are page cache the kernel can drop and read again, and
  they are the arrays themselves: the image cache (1 byte a pixel) and the feature cache
  (2 bytes a feature).

Linear time means a large/small time ratio near the size ratio. Flat memory means that the peak
over the baseline, less what the phase legitimately holds (the records and returned features in
anonymous memory, the mapped arrays), stays the same at both sizes: the bytes it adds per added
image stay near 0. The records of a scan (a path, a key and a label each, some 800 bytes in
Python) are the one structure held in memory that grows with the count.

The synthetic set and the caches go in a temporary folder, or in ``--cache-dir`` (where the set
is kept for the next run; the caches are rebuilt every run, so that their building is timed).
Linux only (``/proc``).
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
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from harness import argument_parser, print_figures, work_dir

from datamodules.cache import load_or_build
from datamodules.datamodule import PlanktonImages
from datamodules.preprocessing import Preprocessing
from datamodules.sources import scan
from datamodules.synthetic import MANIFEST_NAME, SyntheticPlankton, ensure_dataset
from datamodules.views import eval_view
from lightning_modules.diffusion.noise_schedule import NoiseSchedule
from lightning_modules.diffusion.unet import UNet
from lightning_modules.probes.feature_cache import load_or_extract
from lightning_modules.probes.features import DiffusionFeatures, UNetFeatures

T = TypeVar("T")
SIZES, QUICK_SIZES = (50_000, 200_000), (5_000, 20_000)
CLASSES, IMAGE_SIZE = 20, 16
PHASES = ("scan", "cache", "features")
EXTRACT_BATCH = 256
SAMPLE_S = 0.01  # how often the parent reads a phase's memory
MIB = 2**20


def status_bytes(pid: int | str = "self") -> dict[str, int]:
    """``VmRSS``, ``VmHWM`` (the peak), ``RssAnon`` and ``RssFile`` of a process in bytes (empty
    once it has exited)."""
    figures = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    figures[name] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return figures


def reset_peak() -> bool:
    """Restart this process's peak resident size (``VmHWM``, ``ru_maxrss``) from its current
    size, so that the peak read afterwards is the phase's and not the imports'. False where the
    kernel does not allow it (before Linux 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def feature_source() -> UNetFeatures:
    """A U-Net of the probes' kind, small enough for 2 CPU cores, every block at two timesteps.
    Untrained: its features mean nothing, but they cost what trained ones cost."""
    torch.manual_seed(0)
    unet = UNet(
        image_size=IMAGE_SIZE, base_channels=8, channel_mult=(1, 2), attention_resolutions=()
    )
    return DiffusionFeatures.from_unet(
        unet, NoiseSchedule(), layers=["*"], timesteps=[10, 100], micro_batch=64
    )


def timed(call: Callable[[], T]) -> tuple[T, float, float]:
    """What ``call`` returns, with its wall and CPU seconds."""
    start, cpu = time.perf_counter(), time.process_time()
    result = call()
    return result, time.perf_counter() - start, time.process_time() - cpu


def run_phase(phase: str, data: Path, caches: Path, count: int) -> dict:
    """One phase in this (fresh) process: its seconds and what it legitimately holds, in
    anonymous memory (``held``) and in memory-mapped arrays (``mapped``), in bytes."""
    settings = Preprocessing(image_size=IMAGE_SIZE)
    before = status_bytes()
    if phase == "baseline":
        return {"held": 0, "mapped": 0}
    if phase == "scan":
        records, seconds, cpu = timed(lambda: scan(data).records)
        # The scan's output: every record, held until the process ends.
        held = status_bytes()["RssAnon"] - before["RssAnon"]
        return {"seconds": seconds, "cpu": cpu, "count": len(records), "held": held, "mapped": 0}
    if phase == "cache":
        records = scan(data).records
        held = status_bytes()["RssAnon"] - before["RssAnon"]  # the records, its input
        reset_peak()
        cached, seconds, cpu = timed(
            lambda: load_or_build(records, settings, caches, str(data), progress=False)
        )
        return {
            "seconds": seconds,
            "cpu": cpu,
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
    reset_peak()
    features, seconds, cpu = timed(
        lambda: load_or_extract(source, images, caches, EXTRACT_BATCH, progress=False)
    )
    returned = sum(f.numel() * f.element_size() for f in features.values())
    return {
        "seconds": seconds,
        "cpu": cpu,
        "count": count,
        # The returned features (a copy in memory), and the rows and labels of the split.
        "held": returned + rows.nbytes + labels.nbytes,
        # Every image read through the cache's map; the feature cache written through one map,
        # closed, then read back through another.
        "mapped": count * IMAGE_SIZE**2 + count * width * 2,
    }


def measure(phase: str, data: Path, caches: Path, count: int, threads: int) -> dict:
    """Run ``phase`` in a fresh process of this script; its result with its peak resident size
    (exact: the phase's own ``VmHWM``) and its peaks of anonymous and file-backed memory
    (sampled, so a peak shorter than ``SAMPLE_S`` may be missed)."""
    result_file = caches / f"{phase}.json"
    command = [sys.executable, __file__, "--phase", phase, "--data", str(data)]
    command += ["--caches", str(caches), "--count", str(count), "--result", str(result_file)]
    command += ["--threads", str(threads)]
    process = subprocess.Popen(command)
    peaks = {"RssAnon": 0, "RssFile": 0}
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        for name, value in status_bytes(process.pid).items():
            peaks[name] = max(peaks.get(name, 0), value)
        time.sleep(SAMPLE_S)
    # Reaped here, by wait4 for its resource usage: tell the Popen object so.
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"phase {phase} at {count} images failed (exit {process.returncode})")
    result = json.loads(result_file.read_text())
    result_file.unlink()
    if result["peak"] is None:
        result["peak"] = usage.ru_maxrss * 1024  # KiB on Linux
    anon, file = (max(peaks[name], result["end"][name]) for name in ("RssAnon", "RssFile"))
    return {**result, "anon": anon, "file": file}


def dataset(root: Path, count: int) -> tuple[Path, int]:
    """The class folders of a balanced synthetic set of about ``count`` images (generated on
    first use) and its exact image count."""
    per_class = math.ceil(count / CLASSES)
    spec = SyntheticPlankton(
        classes=CLASSES, per_class=per_class, imbalance=1.0, size=IMAGE_SIZE, domains=["source"]
    )
    total = CLASSES * per_class
    # Where ensure_dataset keeps it: a set kept in --cache-dir by an earlier run is reused.
    reused = (root / "synthetic" / spec.fingerprint() / MANIFEST_NAME).exists()
    start = time.perf_counter()
    manifest = ensure_dataset(spec, root, progress=False)
    seconds = time.perf_counter() - start
    if reused:
        print(f"reused the synthetic set of {total} images in {manifest.parent}")
    else:
        print(f"generated {total} images in {seconds:.0f} s ({total / seconds:.0f} img/s)")
    return manifest.parent, total


def child(args: argparse.Namespace) -> None:
    """Run one phase and write its result, with its exact peak when the peak could be reset
    (else the parent takes the whole process's, imports included) and its memory at the end,
    its output still held (the parent's samples may miss that last moment)."""
    torch.set_num_threads(args.threads)
    exact = reset_peak()
    result = run_phase(args.phase, args.data, args.caches, args.count)
    end = status_bytes()
    result |= {"peak": end["VmHWM"] if exact else None, "end": end}
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
    # One thread by default: at 16 px the extraction's threads meet thousands of times a batch,
    # and each meeting waits for any thread another job holds off its core. With 2 threads on 2
    # cores that another job shared, extraction ran 5 to 25 times slower from run to run (CPU
    # seconds rising as much), which hid the scaling this measures.
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads of every phase (default 1)"
    )
    # How the parent starts each phase in a fresh process of this script.
    for name in ("phase", "data", "caches", "count", "result"):
        kind = {"count": int, "phase": str}.get(name, Path)
        parser.add_argument(f"--{name}", type=kind, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase is not None:
        child(args)
        return
    # Line by line, so that this report and the phases' own lines (printed by the children
    # straight to the terminal) come in the order they happen.
    sys.stdout.reconfigure(line_buffering=True)

    sizes = args.sizes or (QUICK_SIZES if args.quick else SIZES)
    results: dict[int, dict[str, dict]] = {}
    with work_dir(args.cache_dir) as root:
        for size in sizes:
            data, count = dataset(root, size)
            with tempfile.TemporaryDirectory(dir=root) as folder:
                caches = Path(folder)
                runs = {"baseline": measure("baseline", data, caches, count, args.threads)}
                for phase in PHASES:
                    runs[phase] = measure(phase, data, caches, count, args.threads)
            results[count] = runs
            report(count, runs)
    small, large = sorted(results)
    figures = {"small": small, "large": large, "size_ratio": round(large / small, 2)}
    print(f"\nlarge/small ({large} / {small} images = {large / small:.2f}x):")
    for phase in PHASES:
        time_ratio = results[large][phase]["seconds"] / results[small][phase]["seconds"]
        cpu_ratio = results[large][phase]["cpu"] / results[small][phase]["cpu"]
        growth = [over_baseline(results[n], phase) for n in (small, large)]
        other = [beyond_arrays(results[n], phase) for n in (small, large)]
        per_image = (other[1] - other[0]) / (large - small)
        print(
            f"  {phase:8} time {time_ratio:5.2f}x (CPU {cpu_ratio:5.2f}x); peak RSS over the "
            f"baseline {growth[1] / growth[0]:5.2f}x ({mib(growth[0])} -> {mib(growth[1])}); "
            f"beyond what it holds {mib(other[0])} -> {mib(other[1])} "
            f"({per_image:+.0f} bytes an added image)"
        )
        figures[f"{phase}_time_ratio"] = round(time_ratio, 2)
        figures[f"{phase}_cpu_ratio"] = round(cpu_ratio, 2)
        figures[f"{phase}_rss_ratio"] = round(growth[1] / growth[0], 2)
        figures[f"{phase}_beyond_b_per_img"] = round(per_image)
    print_figures(**figures)


def mib(size: float) -> str:
    return f"{size / MIB:.1f} MiB"


def over_baseline(runs: dict, phase: str) -> int:
    """The phase's peak resident size beyond that of a process with the same imports."""
    return runs[phase]["peak"] - runs["baseline"]["peak"]


def beyond_arrays(runs: dict, phase: str) -> int:
    """The peak over the baseline beyond what the phase legitimately holds: flat memory keeps
    this the same at every image count."""
    return over_baseline(runs, phase) - runs[phase]["held"] - runs[phase]["mapped"]


def report(count: int, runs: dict) -> None:
    base = runs["baseline"]
    print(
        f"{count} images at {IMAGE_SIZE} px; baseline process (the same imports): "
        f"{base['peak'] / MIB:.0f} MiB resident, {base['anon'] / MIB:.0f} MiB anonymous, "
        f"{base['file'] / MIB:.0f} MiB file-backed"
    )
    print(
        "  phase     seconds   CPU s    img/s  peak MiB  +peak MiB  holds MiB  mapped MiB"
        "  beyond MiB  +anon MiB  +file MiB"
    )
    for phase in PHASES:
        run = runs[phase]
        print(
            f"  {phase:8} {run['seconds']:8.2f} {run['cpu']:7.2f} {count / run['seconds']:8.0f} "
            f"{run['peak'] / MIB:9.0f} {over_baseline(runs, phase) / MIB:10.1f} "
            f"{run['held'] / MIB:10.1f} {run['mapped'] / MIB:11.1f} "
            f"{beyond_arrays(runs, phase) / MIB:11.1f} {(run['anon'] - base['anon']) / MIB:10.1f} "
            f"{(run['file'] - base['file']) / MIB:10.1f}"
        )


if __name__ == "__main__":
    main()
