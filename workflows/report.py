"""The report of an experiment, rebuilt from its run folder alone (``plankton report RUN_DIR``):
``report.md`` for a person, ``results.csv`` and ``results.json`` for a script, PNG figures."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, f1_score

from datamodules.store import write_csv_atomic, write_text_atomic
from lightning_modules import BASELINES, METHODS, DiffusionModule
from lightning_modules.common.abundance import ESTIMATORS, PLANTED_DRAWS, half_l1
from lightning_modules.common.figures import abundance_figure, confusion_figure, save_figure
from lightning_modules.common.module import load_checkpoint

from .experiment import STAGES
from .report_readouts import online_probe_section, readout_label, readouts_section

PER_CLASS_SHOWN = 5
# The floor every learned feature must clear: the probe of `probes: {pixels: ...}`.
PIXELS_ROW = "raw pixels (logistic regression)"
# The columns of results.csv: a record's score, then its head's calibration and its counts
# (empty in runs written before classifiers were calibrated).
COLUMNS = (
    "regime", "method", "eval_set", "metric", "value", "drop_from_test", "key",
    "val_ece_before", "val_ece_after", *(f"count_error_{m}" for m in ESTIMATORS),
    "class_mix_shift",
)  # fmt: skip


class Row(NamedTuple):
    """A row of the main table: its label, the run folders' prefix, the metric prefix in
    ``results.json``."""

    label: str
    run: str
    metric_prefix: str


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _regimes(experiment: dict) -> list[str]:
    return experiment.get("regimes", ["balanced", "long_tailed"])


def experiment_baselines(experiment: dict) -> list[str]:
    """The registered baselines an experiment ran, in the registry's order."""
    return [name for name in BASELINES if name in (experiment.get("baselines") or {})]


def table_rows(experiment: dict) -> list[Row]:
    """The diffusion rows (the best pair, the fusion, every readout), then per baseline its
    end-to-end row (a method that learns from labels is a classifier itself) and its probe."""
    rows = [
        Row("diffusion best (layer, t)", "probe_diffusion", "best_"),
        Row("diffusion fusion (top-k keys)", "probe_diffusion", "fusion_"),
    ]
    for name, readout in ((experiment.get("probes") or {}).get("readouts") or {}).items():
        rows.append(
            Row(f"diffusion {readout_label(name, readout)}", f"probe_diffusion_{name}", "best_")
        )
    for name in experiment_baselines(experiment):
        method = METHODS[name]
        if method.per_regime:
            rows.append(Row(f"{method.display_name} end to end", name, ""))
        rows.append(Row(f"{method.display_name} probe", f"probe_{name}", "best_"))
    if "pixels" in (experiment.get("probes") or {}):
        rows.append(Row(PIXELS_ROW, "probe_pixels", "best_"))
    return rows


def _head(row: Row) -> str:
    """The head of a run whose scores ``row`` shows, as ``results.json`` names its calibration:
    a probe's ``fusion``, or ``classify`` (a probe's best key, an end-to-end network)."""
    return "fusion" if row.metric_prefix == "fusion_" else "classify"


def _class_mix_shift(results: dict, abundance: dict) -> float:
    """How far a labelled set's true class mix is from the run's training split (half L1)."""
    counts = np.asarray(results["train_counts"], dtype=np.float64)
    return half_l1(abundance["true"], counts / counts.sum())


def _rounded(value: float | None) -> float | None:
    return round(value, 4) if value is not None else None


def _calibration_fields(results: dict, head: str, eval_set: str) -> dict:
    """A record's validation ECE of its head, the half-L1 error of every estimator's counts on
    ``eval_set`` (only for the classify head: the counts are computed with it) and how far that
    set's class mix is from training; None where the run predates calibration."""
    calibration = (results.get("calibration") or {}).get(head, {})
    abundance = (results.get("abundance") or {}).get(eval_set)
    errors = abundance["error"] if abundance and head == "classify" else {}
    shift = _class_mix_shift(results, abundance) if abundance else None
    return {
        "val_ece_before": _rounded(calibration.get("ece_before")),
        "val_ece_after": _rounded(calibration.get("ece_after")),
        **{f"count_error_{m}": _rounded(errors.get(m)) for m in ESTIMATORS},
        "class_mix_shift": _rounded(shift),
    }


def collect_results(run_dir: Path) -> list[dict]:
    """One record per (regime, method, eval set, metric), with the drop from the test split, the
    validation ECE of the method's head and the errors of its counts on the eval set."""
    experiment = _read_json(run_dir / "experiment.json")
    records = []
    for regime in _regimes(experiment):
        for row in table_rows(experiment):
            results = _read_json(run_dir / "runs" / f"{row.run}_{regime}" / "results.json")
            if not results:
                continue
            metrics, metric_prefix = results["metrics"], row.metric_prefix
            for eval_set in results["eval_sets"]:
                calibration = _calibration_fields(results, _head(row), eval_set)
                for metric in ("acc", "macro_f1"):
                    value = metrics.get(f"{eval_set}/{metric_prefix}{metric}")
                    test = metrics.get(f"test/{metric_prefix}{metric}")
                    if value is None:
                        continue
                    records.append(
                        {
                            "regime": regime,
                            "method": row.label,
                            "eval_set": eval_set,
                            "metric": metric,
                            "value": round(value, 4),
                            "drop_from_test": round(test - value, 4) if test is not None else None,
                            "key": results.get("best_key") if metric_prefix == "best_" else None,
                            **calibration,
                        }
                    )
    return records


def missing_runs(run_dir: Path) -> list[str]:
    """The evaluated runs the main table expects and the folder lacks (a stage not run yet)."""
    experiment = _read_json(run_dir / "experiment.json")
    return [
        f"{prefix}_{regime}"
        for regime in _regimes(experiment)
        for prefix in dict.fromkeys(row.run for row in table_rows(experiment))
        if not (run_dir / "runs" / f"{prefix}_{regime}" / "results.json").exists()
    ]


def _main_tables(records: list[dict]) -> list[str]:
    lines = []
    for regime in dict.fromkeys(r["regime"] for r in records):
        chosen = [r for r in records if r["regime"] == regime]
        cell = {(r["method"], r["eval_set"], r["metric"]): r for r in chosen}
        eval_sets = list(dict.fromkeys(r["eval_set"] for r in chosen))
        header = ["method"]
        for eval_set in eval_sets:
            header += [f"{eval_set} acc", f"{eval_set} macro-F1"]
        lines += [f"### Regime: {regime}", "", "| " + " | ".join(header) + " |"]
        lines.append("|" + "---|" * len(header))
        for method in dict.fromkeys(r["method"] for r in chosen):
            cells = [method]
            key = next((r["key"] for r in chosen if r["method"] == method and r["key"]), None)
            if key:
                cells[0] += f" `{key[0]}` t={key[1]}" if key[1] is not None else ""
            for eval_set in eval_sets:
                for metric in ("acc", "macro_f1"):
                    record = cell.get((method, eval_set, metric))
                    if record is None:
                        cells.append("")
                        continue
                    value, drop = record["value"], record["drop_from_test"]
                    shown = f"{value:.3f}"
                    if eval_set != "test" and drop is not None:
                        shown += f" ({-drop:+.3f})"
                    cells.append(shown)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines.append(
        "Out-of-distribution cells show, in brackets, the change from the test split of the same "
        "method (negative: a drop)."
    )
    return lines + [""]


def _diffusion_checkpoint(run_dir: Path) -> tuple[Path, dict | None]:
    """The diffusion run's checkpoint folder and its ``last.ckpt`` loaded (None before it is
    trained), read once for the U-Net's blocks and the online probe's history."""
    folder = run_dir / "runs" / "diffusion" / "checkpoints"
    last = folder / "last.ckpt"
    return folder, load_checkpoint(last) if last.exists() else None


def _resolution_table(run_dir: Path, regime: str, info: dict) -> list[str]:
    """Best validation macro-F1 per U-Net resolution, so it is plain which feature size wins."""
    table = run_dir / "runs" / f"probe_diffusion_{regime}" / "probe_results.csv"
    if not table.exists() or not info:
        return []
    best: dict[int, tuple[float, str]] = {}
    with open(table, newline="") as handle:
        for row in csv.DictReader(handle):
            if row["split"] != "val" or row["layer"] not in info:
                continue
            resolution, score = info[row["layer"]].resolution, float(row["macro_f1"])
            if score > best.get(resolution, (-1.0, ""))[0]:
                best[resolution] = (score, f"`{row['layer']}` t={row['timestep']}")
    lines = ["| feature map | best val macro-F1 | where |", "|---|---|---|"]
    for resolution, (score, where) in sorted(best.items(), reverse=True):
        lines.append(f"| {resolution}x{resolution} | {score:.3f} | {where} |")
    winner = max(best.items(), key=lambda item: item[1][0])[0]
    return lines + ["", f"The {winner}x{winner} feature maps give the best probe ({regime}).", ""]


def _clustering_table(run_dir: Path, experiment: dict) -> list[str]:
    lines = ["| features | key | NMI | ARI | purity |", "|---|---|---|---|---|"]
    found = False
    for source in ("diffusion", *experiment_baselines(experiment), "pixels"):
        path = run_dir / "clustering" / source / "clustering.csv"
        if not path.exists():
            continue
        found = True
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        best = max(rows, key=lambda row: float(row["nmi"]))
        key = best["layer"] + (f" t={best['timestep']}" if best["timestep"] else "")
        scores = " | ".join(f"{float(best[s]):.3f}" for s in ("nmi", "ari", "purity"))
        name = METHODS[source].display_name if source in METHODS else "raw pixels"
        lines.append(f"| {name} | {key} | {scores} |")
    if not found:
        return []
    return lines + ["", "Diffusion: the key with the best NMI of the whole grid.", ""]


def _best_run(
    run_dir: Path, experiment: dict, records: list[dict], regime: str
) -> tuple[str, Path] | None:
    """The method with the best test macro-F1 in ``regime`` that has test predictions."""
    candidates = [
        r
        for r in records
        if r["regime"] == regime and r["eval_set"] == "test" and r["metric"] == "macro_f1"
        and "fusion" not in r["method"]
    ]  # fmt: skip
    for record in sorted(candidates, key=lambda r: -r["value"]):
        prefix = next(row.run for row in table_rows(experiment) if row.label == record["method"])
        folder = run_dir / "runs" / f"{prefix}_{regime}"
        if (folder / "test_predictions.npz").exists():
            return record["method"], folder
    return None


def _per_class_and_confusion(
    run_dir: Path, experiment: dict, records: list[dict], regime: str
) -> list[str]:
    best = _best_run(run_dir, experiment, records, regime)
    if best is None:
        return []
    method, folder = best
    results = _read_json(folder / "results.json")
    saved = np.load(folder / "test_predictions.npz")
    labels, predicted = saved["labels"], saved["probabilities"].argmax(1)
    names, counts = results["class_names"], results["train_counts"]
    classes = list(range(len(names)))
    f1 = f1_score(labels, predicted, labels=classes, average=None, zero_division=0)
    order = sorted(classes, key=lambda c: counts[c])
    shown = order[:PER_CLASS_SHOWN] + [
        c for c in order[-PER_CLASS_SHOWN:] if c not in order[:PER_CLASS_SHOWN]
    ]
    lines = [
        f"Best method by test macro-F1 ({regime}): **{method}**. The {PER_CLASS_SHOWN} rarest and "
        f"{PER_CLASS_SHOWN} most common classes of its training split:",
        "",
        "| class | training images | test F1 |",
        "|---|---|---|",
    ]
    lines += [f"| {names[c]} | {counts[c]} | {f1[c]:.3f} |" for c in shown]
    matrix = confusion_matrix(labels, predicted, labels=classes)
    figure = confusion_figure(torch.as_tensor(matrix), names, f"{method}, test ({regime})")
    save_figure(figure, run_dir / "figures" / "confusion_best.png")
    return lines + ["", "![confusion matrix](figures/confusion_best.png)", ""]


class Classifier(NamedTuple):
    """An evaluated classifier run: its regime, the label of each of its heads, its
    ``results.json``."""

    regime: str
    labels: dict[str, str]
    results: dict


def _classifiers(run_dir: Path, experiment: dict) -> list[Classifier]:
    """Every evaluated classifier run (an end-to-end method or a probe), its heads labelled as
    the main table's rows; a fusion head without a row of its own is its probe's + (fusion)."""
    rows = table_rows(experiment)
    classifiers = []
    for regime in _regimes(experiment):
        for run in dict.fromkeys(row.run for row in rows):
            results = _read_json(run_dir / "runs" / f"{run}_{regime}" / "results.json")
            if not results:
                continue
            labels: dict[str, str] = {}
            for row in rows:
                if row.run == run:
                    labels.setdefault(_head(row), row.label)
            labels.setdefault("fusion", f"{labels['classify']} (fusion)")
            classifiers.append(Classifier(regime, labels, results))
    return classifiers


def _calibration_table(classifiers: list[Classifier]) -> list[str]:
    """Every calibrated head's temperature, validation ECE and NLL, and rejection threshold."""
    lines = [
        "| method | regime | temperature | val ECE before -> after | val NLL before -> after | "
        "rejection threshold | val precision | val coverage |",
        "|---|---|---|---|---|---|---|---|",
    ]
    targets = set()
    for classifier in classifiers:
        for head, c in (classifier.results.get("calibration") or {}).items():
            rejection = c["rejection"]
            target = rejection["target_precision"]
            targets.add(target)
            precision = f"{rejection['precision']:.3f}"
            if rejection["precision"] < target:
                precision += f" (below target {target:.3f})"
            lines.append(
                f"| {classifier.labels[head]} | {classifier.regime} | {c['temperature']:.3f} | "
                f"{c['ece_before']:.3f} -> {c['ece_after']:.3f} | "
                f"{c['nll_before']:.3f} -> {c['nll_after']:.3f} | {rejection['threshold']:.3f} | "
                f"{precision} | {rejection['coverage']:.3f} |"
            )
    if not targets:
        return []
    shown = ", ".join(f"{t:.3f}" for t in sorted(targets))
    return ["### Calibration and unknowns", "", *lines] + [
        "",
        "Each head's logits are divided by one temperature fitted on the validation split "
        "(Guo et al. 2017); ECE and NLL are measured there before and after. An image whose "
        "largest calibrated probability is below the rejection threshold is reported as "
        f"unknown: the lowest threshold at which the accepted validation images reach the "
        f"target precision ({shown}; 0 accepts every image), coverage the share of validation "
        "images it accepts. Labels are used here only on the validation split, to calibrate, to "
        "choose the threshold and to measure the misclassification rates that adjust the "
        "counts below; label-free pretraining stays label-free.",
        "",
    ]


def _abundance_tables(classifiers: list[Classifier]) -> list[str]:
    """Per eval set, every classifier's error of each estimator's class fractions, and how far
    the set's true class mix is from each regime's training split."""
    counted = [c for c in classifiers if c.results.get("abundance")]
    if not counted:
        return []
    lines = [
        "### Counts under a change of class mix",
        "",
        "Half the L1 distance between a set's true class fractions and those estimated from a "
        "classifier's calibrated predictions (0: exact; the share of images that would have to "
        "change class), lowest per row in bold. cc counts predicted classes; acc and pacc "
        "correct the (probabilistic) counts by the validation misclassification rates; emq "
        "re-estimates the class priors by EM (Saerens et al. 2002). `test`, held out from the "
        "training images, comes first as the in-distribution reference; the balanced regime caps "
        "the training images per class, so even test's class mix differs from its training's.",
        "",
    ]
    eval_sets = dict.fromkeys(name for c in counted for name in c.results["abundance"])
    for eval_set in sorted(eval_sets, key=lambda name: name != "test"):
        reference = " (in-distribution reference)" if eval_set == "test" else ""
        lines += [
            f"#### `{eval_set}`{reference}",
            "",
            "| method | regime | " + " | ".join(ESTIMATORS) + " |",
            "|---|---|" + "---|" * len(ESTIMATORS),
        ]
        shifts = {}
        planted_shown = False
        for classifier in counted:
            abundance = classifier.results["abundance"].get(eval_set)
            if abundance is None:
                continue
            # The set's and its regime's training split's, so the same for every classifier.
            shift = _class_mix_shift(classifier.results, abundance)
            shifts.setdefault(
                classifier.regime,
                f"{classifier.regime} {shift:.3f} ({abundance['images']:,} images)",
            )
            errors = [round(abundance["error"][m], 3) for m in ESTIMATORS]
            lowest = min(errors)  # compared as shown, so cells that read the same are all bold
            cells = [f"**{e:.3f}**" if e == lowest else f"{e:.3f}" for e in errors]
            planted = abundance.get("planted_error")
            if planted:  # runs evaluated before the planted check have none
                planted_shown = True
                # Runs evaluated before the exact-rate check have none.
                exact = planted.get("exact_rates", {})
                cells = [
                    f"{cell} ({planted[method]:.3f}"
                    + (f", exact {exact[method]:.3f})" if method in exact else ")")
                    for cell, method in zip(cells, ESTIMATORS, strict=True)
                ]
            lines.append(
                f"| {classifier.labels['classify']} | {classifier.regime} | {' | '.join(cells)} |"
            )
        lines += [
            "",
            f"True shift of the class mix of `{eval_set}` from the training split (half L1 "
            f"between its true and the training fractions): {'; '.join(shifts.values())}.",
            "",
        ]
        if planted_shown:  # the test split itself is never planted
            lines += [_PLANTED_NOTE.format(eval_set=eval_set), ""]
    return lines


_PLANTED_NOTE = (
    f"In brackets: the mean error over {PLANTED_DRAWS} samples of the test images drawn per "
    "class to `{eval_set}`'s class counts, the same class mix with no change of appearance; "
    "for acc and pacc then (exact) the error with those test images' own misclassification "
    "rates, exact for these samples. A correction that beats cc in brackets but not on "
    "`{eval_set}` is defeated by the set's change of appearance. One that loses in brackets "
    "but wins with exact rates is limited by the validation split (more validation images per "
    "class narrow its rates). One that loses even with exact rates cannot beat counting on a "
    "sample of this size: undoing the confusion between classes the classifier mixes up "
    "amplifies the sample's own noise more than it removes bias (larger samples, or a "
    "classifier that separates those classes, help)."
)


def _best_counts(run_dir: Path, experiment: dict, records: list[dict], regime: str) -> list[str]:
    """The best method's estimated fraction of every class on each out-of-distribution set,
    as a table and a figure of true against estimated fractions."""
    best = _best_run(run_dir, experiment, records, regime)
    if best is None:
        return []
    method, folder = best
    results = _read_json(folder / "results.json")
    shifted = {k: v for k, v in (results.get("abundance") or {}).items() if k != "test"}
    if not shifted:
        return []
    names = results["class_names"]
    lines = [
        f"### Per-class counts of the best method ({regime}): {method}",
        "",
        "Estimated class fractions against the true ones, most abundant classes first.",
        "",
    ]
    for eval_set, abundance in shifted.items():
        true, estimates = abundance["true"], abundance["estimates"]
        lines += [
            f"#### `{eval_set}`",
            "",
            "| class | true fraction | " + " | ".join(ESTIMATORS) + " |",
            "|---|---|" + "---|" * len(ESTIMATORS),
        ]
        for c in sorted(range(len(names)), key=lambda c: -true[c]):
            cells = " | ".join(f"{estimates[m][c]:.3f}" for m in ESTIMATORS)
            lines.append(f"| {names[c]} | {true[c]:.3f} | {cells} |")
        figure = abundance_figure(
            true, {m: estimates[m] for m in ESTIMATORS}, f"{method}, {eval_set} ({regime})"
        )
        save_figure(figure, run_dir / "figures" / f"abundance_{eval_set}.png")
        lines += [
            "",
            f"![true vs estimated fractions, {eval_set}](figures/abundance_{eval_set}.png)",
            "",
        ]
    return lines


def _settings(experiment: dict) -> list[str]:
    """Each method's config and the experiment's changes to it."""
    methods = {"diffusion": experiment.get("diffusion", {})}
    methods |= {name: s for name, s in (experiment.get("baselines") or {}).items()}
    methods |= {f"probe ({name})": s for name, s in (experiment.get("probes") or {}).items()}
    lines = ["| method | config | epochs | changed settings |", "|---|---|---|---|"]
    for name, section in methods.items():
        changes = ", ".join(f"`{k}={v}`" for k, v in (section.get("overrides") or {}).items())
        lines.append(
            f"| {name} | `{Path(section.get('config', '')).name}` | "
            f"{section.get('max_epochs', '')} | {changes or 'none'} |"
        )
    shared = ", ".join(f"`{k}={v}`" for k, v in (experiment.get("trainer_overrides") or {}).items())
    return lines + [
        "",
        "Every run reads the shared `configs/trainer/default.yaml`"
        + (f", changed for this experiment: {shared}" if shared else "")
        + "; every method the same data config.",
        "",
    ]


def collapse_warnings(run_dir: Path) -> list[str]:
    """One line per run whose encoder looked collapsed after its last epoch."""
    lines = []
    for path in sorted((run_dir / "runs").glob("*/compute.json")):
        run = _read_json(path)
        collapsed = (run.get("collapse") or {}).get("collapsed")
        if collapsed:
            lines.append(
                f"- **Warning: `{run['method']}` looks collapsed** after its last epoch "
                f"({'; '.join(collapsed)}): its probe rows measure an encoder that maps images "
                "to nearly the same features."
            )
    return lines


def _compute_table(run_dir: Path) -> list[str]:
    lines = [
        "| run | regime | epochs | images seen | global batch | training GFLOP per image | "
        "training TFLOP | wall time (s) | trainable parameters | all parameters | precision | "
        "device |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    budgets = set()
    for path in sorted((run_dir / "runs").glob("*/compute.json")):
        c = _read_json(path)
        resumed = " (resumed)" if c["resumed"] else ""
        per_image = c.get("train_flops_per_image")  # absent in runs of earlier versions
        flops = f"{per_image / 1e9:.3g} | {c['train_flops'] / 1e12:.3g}" if per_image else " | "
        if c.get("budget"):
            budgets.add(", ".join(f"{k} {v:g}" for k, v in c["budget"].items()))
        lines.append(
            f"| {c['method']} | {c['regime']} | {c['epochs']} | {c['images_seen']:,} | "
            f"{c['batch_size']} | {flops} | {c['wall_s']:.0f}{resumed} | "
            f"{c['trainable_parameters']:,} | {c['parameters']:,} | {c['precision']} | "
            f"{c['devices']} x {c['accelerator']} |"
        )
    notes = [
        "",
        "Images seen count each training image once per epoch, however many augmented views a "
        "method makes of it. Training FLOPs per image are counted by PyTorch's FlopCounterMode "
        "on one training step (every view, a teacher's forward, the backward pass; matrix "
        "products, convolutions and attention), times the images seen. Probe runs train only "
        "their linear heads on frozen features (extraction is not counted). A resumed run's "
        "wall time includes its interrupted attempts up to their last epoch.",
    ]
    if budgets:
        notes.append(f"Every pretraining run had the same budget: {'; '.join(sorted(budgets))}.")
    return lines + notes + [""]


def build_report(run_dir: str | Path) -> Path:
    """Write ``report.md``, ``results.csv``, ``results.json`` and figures into ``run_dir``."""
    run_dir = Path(run_dir)
    if not (run_dir / "experiment.json").exists():
        raise FileNotFoundError(
            f"{run_dir} is not an experiment run folder (no experiment.json): "
            "run plankton experiment --config ... --out DIR first"
        )
    experiment = _read_json(run_dir / "experiment.json")
    figures = run_dir / "figures"
    figures.mkdir(exist_ok=True)
    records = collect_results(run_dir)
    write_text_atomic(run_dir / "results.json", json.dumps(records, indent=2))
    write_csv_atomic(run_dir / "results.csv", COLUMNS, ([r[c] for c in COLUMNS] for r in records))

    regimes = _regimes(experiment)
    pretrain = experiment.get("pretrain_regime", "long_tailed")
    lines = [f"# Experiment `{experiment.get('name', run_dir.name)}`", ""]
    for regime in regimes:
        summary = _read_json(run_dir / "data" / f"{regime}.json")
        if summary:
            counts = ", ".join(f"{s} {sum(c.values())}" for s, c in summary["counts"].items())
            lines.append(f"- **{regime}**: {len(summary['classes'])} classes; images: {counts}")
    methods = ["diffusion", *experiment_baselines(experiment)]
    label_free = [METHODS[m].display_name for m in methods if not METHODS[m].per_regime]
    per_regime = [METHODS[m].display_name for m in methods if METHODS[m].per_regime]
    lines += [
        f"- Label-free pretraining ({', '.join(label_free)}) on the {pretrain} training split; "
        + "".join(f"{name}, " for name in per_regime)
        + "every linear probe trained per regime.",
        "",
        "## Main results",
        "",
        *_main_tables(records),
    ]
    warnings = collapse_warnings(run_dir)
    if warnings:
        lines += [*warnings, ""]
    missing = missing_runs(run_dir)
    if missing:
        lines += [f"Not in the tables (not evaluated yet): {', '.join(missing)}.", ""]
    lines += [
        "## Diffusion features: layers x timesteps",
        "",
    ]
    checkpoints, last = _diffusion_checkpoint(run_dir)
    # The resolution of every U-Net block, for the table of the best probe per resolution.
    blocks = DiffusionModule.from_checkpoint(last).ema.info if last is not None else {}
    for regime in regimes:
        folder = run_dir / "runs" / f"probe_diffusion_{regime}"
        for metric in ("acc", "macro_f1"):
            heatmap = folder / f"probe_heatmap_val_{metric}.png"
            if heatmap.exists():
                shutil.copy(heatmap, figures / f"heatmap_{regime}_{metric}.png")
                lines.append(f"![{regime} {metric}](figures/heatmap_{regime}_{metric}.png)")
        lines += ["", *_resolution_table(run_dir, regime, blocks)]
        lines += readouts_section(run_dir, experiment, regime)
    lines += online_probe_section(checkpoints, last)
    clustering = _clustering_table(run_dir, experiment)
    if clustering:
        lines += ["## k-means clustering", "", *clustering]
    per_class = _per_class_and_confusion(run_dir, experiment, records, pretrain)
    if per_class:
        lines += ["## Per-class F1 and confusion matrix", "", *per_class]
    classifiers = _classifiers(run_dir, experiment)
    counts = [
        *_calibration_table(classifiers),
        *_abundance_tables(classifiers),
        *_best_counts(run_dir, experiment, records, pretrain),
    ]
    if counts:
        lines += ["## Calibration, unknowns and counts under a change of class mix", "", *counts]
    if (figures / "diffusion_samples.png").exists():
        lines += [
            "## Diffusion samples next to real images",
            "",
            "| samples (EMA weights, DDIM 50 steps) | real validation images |",
            "|---|---|",
            "| ![samples](figures/diffusion_samples.png) | ![real](figures/real_images.png) |",
            "",
        ]
    lines += ["## Settings and compute", "", *_settings(experiment), *_compute_table(run_dir)]
    stages = [
        (stage, _read_json(run_dir / stage / "done.json")["wall_s"])
        for stage in STAGES
        if (run_dir / stage / "done.json").exists()
    ]
    if stages:
        lines += ["| stage | wall time (s) |", "|---|---|"]
        lines += [f"| {name} | {wall:.0f} |" for name, wall in stages]
        lines.append("")
    lines += [
        "TensorBoard logs of every run are under `runs/`: "
        f"`tensorboard --logdir {run_dir}` (or `make tensorboard`).",
        "",
    ]
    report = run_dir / "report.md"
    write_text_atomic(report, "\n".join(lines))
    return report
