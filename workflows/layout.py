"""The run folder of an experiment: its stages and the name of every folder and file in it, for
the runner that writes them and the report that reads them.

    experiment.json            the experiment config as given
    <stage>/done.json          a completed stage (data/ also holds one summary per regime)
    runs/<run>/                one training run: checkpoints/, TensorBoard events, config.yaml,
                               compute.json, and for an evaluated run results.json and
                               test_predictions.npz (a probe also writes probe_results.csv)
    clustering/<source>/       the k-means scores of one feature source
    clustering/split.json      the split clustered (another than asked when that one is absent)
    figures/, report.md, results.csv, results.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lightning_modules import METHODS

STAGES = ("data", "diffusion", "baselines", "probes", "clustering", "report")
# The files of a run folder.
DONE = "done.json"
COMPUTE = "compute.json"
WALL_TIME = "wall_time.json"
RESULTS = "results.json"
TEST_PREDICTIONS = "test_predictions.npz"
RUN_CONFIG = "config.yaml"  # the settings the CLI resolved, saved by Lightning
PROBE_RESULTS = "probe_results.csv"  # a probe's score at every key, written by the probe
LAST_CHECKPOINT = "last.ckpt"


def per_regime(prefix: str, regime: str) -> str:
    """The run of ``prefix`` trained on ``regime``'s training split."""
    return f"{prefix}_{regime}"


def probe_prefix(source: str) -> str:
    """The runs (one per regime) of the linear probe of the feature source ``source``."""
    return f"probe_{source}"


def readout_source(readout: str) -> str:
    """The feature source of a diffusion readout: another probe of the diffusion features."""
    return f"diffusion_{readout}"


def encoder_run(method: str, regime: str) -> str:
    """A method that learns from labels is trained per regime, a label-free one once."""
    return per_regime(method, regime) if METHODS[method].per_regime else method


@dataclass(frozen=True)
class RunLayout:
    """The folders and files of the run folder ``root``."""

    root: Path

    @property
    def experiment(self) -> Path:
        return self.root / "experiment.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def stage(self, stage: str) -> Path:
        return self.root / stage

    def stage_marker(self, stage: str) -> Path:
        return self.stage(stage) / DONE

    def data_summary(self, regime: str) -> Path:
        return self.stage("data") / f"{regime}.json"

    def run(self, run: str) -> Path:
        return self.runs / run

    def checkpoint(self, run: str, name: str = LAST_CHECKPOINT) -> Path:
        return self.run(run) / "checkpoints" / name

    def clustering(self, source: str) -> Path:
        return self.stage("clustering") / source

    @property
    def clustering_split(self) -> Path:
        return self.stage("clustering") / "split.json"
