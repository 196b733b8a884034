"""The report's calibration and counting section, built from a hand-written run folder: three
classifier runs of known calibration and counts on the test split and one out-of-distribution
set, and the same folder as written before classifiers were calibrated."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from lightning_modules.common.abundance import ESTIMATORS, half_l1
from workflows.report import build_report

CLASSES = ["copepod", "diatom", "detritus"]
TRAIN_COUNTS = [60, 30, 10]
TRAIN_FRACTIONS = [0.6, 0.3, 0.1]  # the test split has the training mix
TEMPORAL = [0.2, 0.3, 0.5]  # half-L1 shift from training: (0.4 + 0 + 0.4) / 2 = 0.4
REGIME = "long_tailed"


def calibration(temperature, ece, nll, threshold, precision, coverage) -> dict:
    return {
        "temperature": temperature,
        "ece_before": ece[0],
        "ece_after": ece[1],
        "nll_before": nll[0],
        "nll_after": nll[1],
        "rejection": {
            "threshold": threshold,
            "precision": precision,
            "coverage": coverage,
            "target_precision": 0.9,
        },
    }


def counts(true, images, estimates) -> dict:
    return {
        "images": images,
        "true": true,
        "estimates": dict(zip(ESTIMATORS, estimates, strict=True)),
        "error": {m: half_l1(true, e) for m, e in zip(ESTIMATORS, estimates, strict=True)},
    }


def write_run(
    root: Path,
    run: str,
    metrics: dict,
    heads: dict,
    temporal: list,
    calibrated: bool,
    planted: dict | None = None,
):
    """``runs/<run>_long_tailed/results.json`` as ``ExperimentRunner._evaluate`` writes it; the
    probes' metrics carry the ``best_`` and ``fusion_`` prefixes of their heads. ``planted``:
    the temporal set's errors at its class mix planted on the test images, if any."""
    results = {
        "method": run,
        "regime": REGIME,
        "eval_sets": ["test", "temporal"],
        "class_names": CLASSES,
        "train_counts": TRAIN_COUNTS,
        "metrics": metrics,
        "best_key": ["embedding", None] if run.startswith("probe_") else None,
    }
    if calibrated:
        results["calibration"] = heads
        results["abundance"] = {
            "test": counts(TRAIN_FRACTIONS, 100, [TRAIN_FRACTIONS] * len(ESTIMATORS)),
            "temporal": counts(TEMPORAL, 50, temporal),
        }
        if planted:
            results["abundance"]["temporal"]["planted_error"] = planted
    folder = root / "runs" / f"{run}_{REGIME}"
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    labels = np.array([0, 0, 1, 2])
    np.savez(folder / "test_predictions.npz", probabilities=np.eye(3)[labels], labels=labels)


def scores(prefix: str, test_f1: float) -> dict:
    return {
        f"{split}/{prefix}{metric}": test_f1 - (0.2 if split == "temporal" else 0.0)
        for split in ("test", "temporal")
        for metric in ("acc", "macro_f1")
    }


def write_run_folder(root: Path, calibrated: bool) -> Path:
    """Supervised end to end (the best by test macro-F1), the diffusion probe (its fusion head
    has a row of its own in the main table) and the supervised probe (whose has not)."""
    experiment = {"name": "fixture", "regimes": [REGIME], "pretrain_regime": REGIME,
                  "baselines": {"supervised": {}}}  # fmt: skip
    root.mkdir()
    (root / "experiment.json").write_text(json.dumps(experiment))
    write_run(
        root,
        "supervised",
        scores("", 0.8),
        {"classify": calibration(1.5, (0.12, 0.03), (0.9, 0.7), 0.6, 0.92, 0.8)},
        # errors 0.2, 0.05, 0.02, 0.01: emq lowest
        [[0.4, 0.3, 0.3], [0.25, 0.3, 0.45], [0.2, 0.32, 0.48], [0.21, 0.3, 0.49]],
        calibrated,
        planted={
            "cc": 0.21,
            "acc": 0.03,
            "pacc": 0.025,
            "emq": 0.015,
            "missing": 0,
            "exact_rates": {"acc": 0.02, "pacc": 0.018},
        },
    )
    write_run(
        root,
        "probe_diffusion",
        scores("best_", 0.75) | scores("fusion_", 0.7),
        {
            "classify": calibration(2.0, (0.2, 0.05), (1.1, 0.95), 0.7, 0.85, 0.6),
            "fusion": calibration(1.2, (0.08, 0.04), (0.8, 0.75), 0.0, 0.93, 1.0),
        },
        # errors 0.3, 0.1, 0.02, 0.06: pacc lowest
        [[0.5, 0.3, 0.2], [0.3, 0.3, 0.4], [0.22, 0.3, 0.48], [0.26, 0.3, 0.44]],
        calibrated,
    )
    write_run(
        root,
        "probe_supervised",
        scores("best_", 0.7) | scores("fusion_", 0.65),
        {
            "classify": calibration(1.1, (0.05, 0.04), (0.6, 0.59), 0.5, 0.95, 0.9),
            "fusion": calibration(1.3, (0.07, 0.02), (0.65, 0.6), 0.55, 0.91, 0.85),
        },
        # errors 0.25, 0, 0.05, 0: acc and emq tie
        [[0.45, 0.3, 0.25], TEMPORAL, [0.25, 0.3, 0.45], TEMPORAL],
        calibrated,
    )
    return root


def section(report: str) -> str:
    return report.split("## Calibration, unknowns and counts")[1].split("\n## ")[0]


def test_report_shows_calibration_counts_and_the_best_methods_fractions(tmp_path):
    root = write_run_folder(tmp_path / "run", calibrated=True)
    report = build_report(root).read_text()
    assert report.index("## Per-class F1") < report.index("## Calibration, unknowns and counts")
    text = section(report)

    calibrated = text.split("### Calibration and unknowns")[1].split("### Counts")[0]
    for row in (
        "| supervised end to end | long_tailed | 1.500 | 0.120 -> 0.030 | 0.900 -> 0.700 | "
        "0.600 | 0.920 | 0.800 |",
        "| diffusion best (layer, t) | long_tailed | 2.000 | 0.200 -> 0.050 | 1.100 -> 0.950 | "
        "0.700 | 0.850 (below target 0.900) | 0.600 |",
        "| diffusion fusion (top-k keys) | long_tailed | 1.200 | 0.080 -> 0.040 | 0.800 -> 0.750 | "
        "0.000 | 0.930 | 1.000 |",
        "| supervised probe (fusion) | long_tailed | 1.300 | 0.070 -> 0.020 | 0.650 -> 0.600 | "
        "0.550 | 0.910 | 0.850 |",
    ):
        assert row in calibrated, row
    assert "Labels are used here only on the validation split" in calibrated

    counted = text.split("### Counts under a change of class mix")[1].split("### Per-class")[0]
    temporal = counted.split("#### `temporal`")[1]
    for row in (
        # In brackets, at the same class mix planted on the test images (this run only).
        "| supervised end to end | long_tailed | 0.200 (0.210) | 0.050 (0.030, exact 0.020) | "
        "0.020 (0.025, exact 0.018) | **0.010** (0.015) |",
        "| diffusion best (layer, t) | long_tailed | 0.300 | 0.100 | **0.020** | 0.060 |",
        "| supervised probe | long_tailed | 0.250 | **0.000** | 0.050 | **0.000** |",
    ):
        assert row in temporal, row
    assert "True shift of the class mix of `temporal` from the training split" in temporal
    assert "the training fractions): long_tailed 0.400 (50 images)." in temporal
    assert "the same class mix with no change of appearance" in temporal
    assert "loses even with exact rates cannot beat counting" in temporal
    reference = counted.split("#### `test` (in-distribution reference)")[1].split("####")[0]
    assert "long_tailed 0.000 (100 images)." in reference
    assert "no change of appearance" not in reference
    assert counted.index("#### `test`") < counted.index("#### `temporal`")

    best = text.split("### Per-class counts of the best method (long_tailed): ")[1]
    assert best.startswith("supervised end to end")
    table = best.split("#### `temporal`")[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "fraction" not in line]
    assert rows == [  # most abundant first
        "| detritus | 0.500 | 0.300 | 0.450 | 0.480 | 0.490 |",
        "| diatom | 0.300 | 0.300 | 0.300 | 0.320 | 0.300 |",
        "| copepod | 0.200 | 0.400 | 0.250 | 0.200 | 0.210 |",
    ]
    assert "](figures/abundance_temporal.png)" in table
    assert (root / "figures" / "abundance_temporal.png").stat().st_size > 0
    assert not (root / "figures" / "abundance_test.png").exists()

    records = {(r["method"], r["eval_set"], r["metric"]): r
               for r in json.loads((root / "results.json").read_text())}  # fmt: skip
    supervised = records["supervised end to end", "temporal", "macro_f1"]
    assert supervised["val_ece_after"] == 0.03 and supervised["count_error_emq"] == 0.01
    assert supervised["class_mix_shift"] == 0.4
    fusion = records["diffusion fusion (top-k keys)", "temporal", "acc"]
    assert fusion["val_ece_before"] == 0.08 and fusion["count_error_cc"] is None  # not counted
    with open(root / "results.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header[:7] == ["regime", "method", "eval_set", "metric", "value", "drop_from_test",
                          "key"]  # fmt: skip
    assert header[7:] == ["val_ece_before", "val_ece_after", "count_error_cc", "count_error_acc",
                          "count_error_pacc", "count_error_emq", "class_mix_shift"]  # fmt: skip


def test_report_of_a_run_before_calibration_has_no_such_section(tmp_path):
    root = write_run_folder(tmp_path / "run", calibrated=False)
    report = build_report(root).read_text()
    assert "## Per-class F1 and confusion matrix" in report
    assert "Calibration" not in report and "Counts under" not in report
    assert not list((root / "figures").glob("abundance_*.png"))
    records = json.loads((root / "results.json").read_text())
    assert records and all(r["val_ece_after"] is None and r["count_error_emq"] is None
                           for r in records)  # fmt: skip
