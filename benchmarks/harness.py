"""What every benchmark shares: its command line, its working folder and its last line."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


def print_figures(**figures: float | int) -> None:
    """The figures as one line of ``key=value`` pairs, the last line a benchmark prints."""
    print(" ".join(f"{key}={value}" for key, value in figures.items()), flush=True)
