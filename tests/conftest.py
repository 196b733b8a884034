"""Shared fixtures: tiny synthetic datasets and an isolated cache folder per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules import SyntheticPlankton

REPOSITORY = Path(__file__).resolve().parents[1]
SHARED_DATA = REPOSITORY.parent / "shared" / "data"


# The experiment tests' diffusion section: the smallest U-Net, one epoch (``{configs}`` is the
# configs folder).
TINY_DIFFUSION = """diffusion:
  config: {configs}/diffusion.yaml
  max_epochs: 1
  overrides:
    model.init_args.base_channels: 8
    model.init_args.channel_mult: [1, 2]
    model.init_args.num_res_blocks: 1
    model.init_args.attention_resolutions: [8]
    model.init_args.num_heads: 2
    model.init_args.timesteps: 100
    model.init_args.val_timesteps: [5]
    model.init_args.sample_every_n_epochs: 0"""


def write_class_folders(root: Path, per_class: int) -> Path:
    """``root/copepod`` and ``root/diatom``, each with ``per_class`` noise PNGs of different
    sizes (20 to 20 + per_class rows by 30 columns)."""
    rng = np.random.default_rng(0)
    for label in ("copepod", "diatom"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 255, (20 + i, 30), dtype=np.uint8)
            Image.fromarray(image).save(root / label / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("plankton-cache")


@pytest.fixture(autouse=True)
def isolated_cache(session_cache, monkeypatch):
    """No test writes into the user's cache; tests of one session share generated data."""
    monkeypatch.setenv("PLANKTON_CACHE", str(session_cache))


@pytest.fixture
def tiny_spec() -> SyntheticPlankton:
    return SyntheticPlankton(classes=4, per_class=24, imbalance=4.0, size=32, seed=3)


def run_script(name: str, *args: object) -> None:
    """Run ``tests/<name>`` in its own process (DDP launches its ranks from a script) and fail
    with the end of its error output if it fails."""
    result = subprocess.run(
        [sys.executable, str(REPOSITORY / "tests" / name), *map(str, args)],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPOSITORY), str(REPOSITORY / "tests")]),
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="session")
def ddp_fits(tmp_path_factory, session_cache) -> Path:
    """The outputs of ``tests/ddp_fits.py``: its two-process DDP fits, launched once for the
    tests of every module that compares ranks (one process group, as an experiment runs), and
    the one-process probe run they are compared with, fitted here."""
    from ddp_fits import fit_probe

    out = tmp_path_factory.mktemp("ddp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PLANKTON_CACHE", str(session_cache))
        fit_probe(out, 1)  # first: it writes the images both ranks then read
        run_script("ddp_fits.py", out)
    return out


def shared_dataset(name: str) -> Path:
    """A real dataset beside the repository, or skip: users and fresh clones do not have it."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real plankton images not available ({name})")
    return path
