"""The rows of an experiment's report and the runs behind them, from the experiment's settings
and its run folder: which run each row of the main table reads, and the best of them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lightning_modules import METHODS
from lightning_modules.common.abundance import half_l1

from .experiment_config import ExperimentSettings
from .layout import RESULTS, TEST_PREDICTIONS, RunLayout, per_regime, probe_prefix, readout_source

# The floor every learned feature must clear: the probe of `probes: {pixels: ...}`.
PIXELS_ROW = "raw pixels (logistic regression)"


class Row(NamedTuple):
    """A row of the main table: its label, the run folders' prefix (one run per regime), the
    metric prefix in ``results.json``."""

    label: str
    run: str
    metric_prefix: str


def read_json(path: Path) -> dict:
    """A JSON file of the run folder; {} for one not written (yet)."""
    return json.loads(path.read_text()) if path.exists() else {}


def table_rows(settings: ExperimentSettings) -> list[Row]:
    """The diffusion rows (the best pair, the fusion, every readout), then per baseline its
    end-to-end row (a method that learns from labels is a classifier itself) and its probe."""
    diffusion = probe_prefix("diffusion")
    rows = [
        Row("diffusion best (layer, t)", diffusion, "best_"),
        Row("diffusion fusion (top-k keys)", diffusion, "fusion_"),
    ]
    for name in settings.readouts:
        label = f"diffusion {settings.readout_label(name)}"
        rows.append(Row(label, probe_prefix(readout_source(name)), "best_"))
    for name in settings.baseline_names:
        method = METHODS[name]
        if method.per_regime:
            rows.append(Row(f"{method.display_name} end to end", name, ""))
        rows.append(Row(f"{method.display_name} probe", probe_prefix(name), "best_"))
    if settings.probes and settings.probes.pixels is not None:
        rows.append(Row(PIXELS_ROW, probe_prefix("pixels"), "best_"))
    return rows


def row_results(layout: RunLayout, row: Row, regime: str) -> Path:
    """The ``results.json`` of ``row``'s run in ``regime``."""
    return layout.run(per_regime(row.run, regime)) / RESULTS


def row_head(row: Row) -> str:
    """The head of a run whose scores ``row`` shows, as ``results.json`` names its calibration:
    a probe's ``fusion``, or ``classify`` (a probe's best key, an end-to-end network)."""
    return "fusion" if row.metric_prefix == "fusion_" else "classify"


def class_mix_shift(results: dict, abundance: dict) -> float:
    """How far a labelled set's true class mix is from the run's training split (half L1)."""
    counts = np.asarray(results["train_counts"], dtype=np.float64)
    return half_l1(abundance["true"], counts / counts.sum())


def best_run(
    layout: RunLayout, settings: ExperimentSettings, records: list[dict], regime: str
) -> tuple[str, Path] | None:
    """The method with the best test macro-F1 in ``regime`` that has test predictions."""
    candidates = [
        r
        for r in records
        if r["regime"] == regime and r["eval_set"] == "test" and r["metric"] == "macro_f1"
        and "fusion" not in r["method"]
    ]  # fmt: skip
    for record in sorted(candidates, key=lambda r: -r["value"]):
        prefix = next(row.run for row in table_rows(settings) if row.label == record["method"])
        folder = layout.run(per_regime(prefix, regime))
        if (folder / TEST_PREDICTIONS).exists():
            return record["method"], folder
    return None
