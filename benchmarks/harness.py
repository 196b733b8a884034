"""What every benchmark shares: its command line, its working folder, its last line, and how a
training step's FLOPs and a GPU's model FLOPs utilisation (MFU) are worked out."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIZES = ("demo", "paper")

# Dense (no sparsity) peak TFLOP/s per GPU from the vendors' datasheets, by the arithmetic a run
# uses. The first name contained in torch.cuda.get_device_name() wins, so the PCIe H100 (a lower
# clock and power limit) comes before the SXM one; H200 has H100's compute. fp16 and bf16 share a
# peak on these chips.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"16-bit": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100", {"16-bit": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("H200", {"16-bit": 989.0, "tf32": 494.0, "fp32": 67.0}),
    ("A100", {"16-bit": 312.0, "tf32": 156.0, "fp32": 19.5}),
)


def argument_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark accepts; a script adds its own before parsing."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="a small run, under a minute on 2 CPU cores"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="keep generated data and caches here between runs (default: a temporary folder)",
    )
    return parser


@contextmanager
def work_dir(cache_dir: Path | None) -> Iterator[Path]:
    """``cache_dir`` when given, else a temporary folder removed afterwards."""
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        yield cache_dir
        return
    with tempfile.TemporaryDirectory(prefix="plankton-bench-") as folder:
        yield Path(folder)


def print_figures(**figures: float | int | str) -> None:
    """The figures as one line of ``key=value`` pairs, the last line a benchmark prints; an empty
    string (a figure that does not apply, such as MFU on a CPU) prints as ``key=``."""
    print(" ".join(f"{key}={value}" for key, value in figures.items()), flush=True)


def size_overrides(method: str, size: str) -> dict[str, object]:
    """CLI overrides (``{"data.image_size": 64, ...}``) that bring ``method``'s own config to
    ``size``: none for ``demo`` (the configs are the demo size), and for ``paper`` the image side
    and the method's model overrides of ``configs/experiments/paper.yaml``. The paper's other data
    settings (a larger synthetic set, its batch and workers) are left out: they change how long
    an epoch is, not what one training step costs per image."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if size == "demo":
        return {}
    from workflows.experiment import Experiment  # the Lightning stack, only when asked

    experiment = Experiment.from_file(CONFIGS / "experiments" / "paper.yaml")
    run = experiment.diffusion if method == "diffusion" else experiment.baselines.get(method)
    overrides = run.overrides if run is not None else {}  # a method the paper does not run
    return {"data.image_size": experiment.data_overrides["image_size"], **overrides}


def peak_flops(device: torch.device | str, precision: str) -> tuple[str, float] | None:
    """``(what, FLOP/s)``: the dense peak of ``device`` for a run at ``precision`` (a Lightning
    precision such as ``bf16-mixed`` or ``32-true``); None off the table (every CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peaks = next((peaks for key, peaks in PEAK_TFLOPS if key in name), None)
    if peaks is None:
        return None
    if precision.startswith(("bf16", "16")):
        arithmetic = "16-bit"
    elif precision.startswith("32"):
        # cuDNN convolutions run in TF32 by default even when matmuls do not, and convolutions
        # are most of a U-Net's or ResNet's FLOPs: against the fp32 peak MFU could exceed 1.
        tf32 = torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
        arithmetic = "tf32" if tf32 else "fp32"
    else:
        return None
    return f"{name} {arithmetic}", peaks[arithmetic] * 1e12


def mfu(
    images_per_second: float, flops_per_image: float, peak: tuple[str, float] | None
) -> float | str:
    """Achieved FLOP/s over the peak, or ``""`` where no peak is known."""
    if peak is None:
        return ""
    return round(images_per_second * flops_per_image / peak[1], 4)
