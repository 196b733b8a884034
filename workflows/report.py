"""The report of an experiment, rebuilt from its run folder alone (``plankton report RUN_DIR``):
``report.md`` for a person, ``results.csv`` and ``results.json`` for a script, PNG figures."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, f1_score

from datamodules.store import write_csv_atomic, write_text_atomic
from lightning_modules import METHODS, DiffusionModule
from lightning_modules.common.abundance import ESTIMATORS
from lightning_modules.common.figures import confusion_figure, save_figure
from lightning_modules.common.module import load_checkpoint

from .experiment_config import ExperimentSettings, MethodSettings, ProbeSettings, read_settings
from .layout import (
    COMPUTE,
    PROBE_RESULTS,
    RESULTS,
    STAGES,
    TEST_PREDICTIONS,
    RunLayout,
    per_regime,
    probe_prefix,
)
from .report_counts import counts_section
from .report_readouts import online_probe_section, readouts_section
from .report_rows import best_run, class_mix_shift, read_json, row_head, row_results, table_rows

PER_CLASS_SHOWN = 5
# The columns of results.csv: a record's score, then its head's calibration and its counts
# (empty in runs written before classifiers were calibrated).
COLUMNS = (
    "regime", "method", "eval_set", "metric", "value", "drop_from_test", "key",
    "val_ece_before", "val_ece_after", *(f"count_error_{m}" for m in ESTIMATORS),
    "class_mix_shift",
)  # fmt: skip


def _rounded(value: float | None) -> float | None:
    return round(value, 4) if value is not None else None


def _calibration_fields(results: dict, head: str, eval_set: str) -> dict:
    """A record's validation ECE of its head, the half-L1 error of every estimator's counts on
    ``eval_set`` (only for the classify head: the counts are computed with it) and how far that
    set's class mix is from training; None where the run predates calibration."""
    calibration = (results.get("calibration") or {}).get(head, {})
    abundance = (results.get("abundance") or {}).get(eval_set)
    errors = abundance["error"] if abundance and head == "classify" else {}
    shift = class_mix_shift(results, abundance) if abundance else None
    return {
        "val_ece_before": _rounded(calibration.get("ece_before")),
        "val_ece_after": _rounded(calibration.get("ece_after")),
        **{f"count_error_{m}": _rounded(errors.get(m)) for m in ESTIMATORS},
        "class_mix_shift": _rounded(shift),
    }


def collect_results(layout: RunLayout, settings: ExperimentSettings) -> list[dict]:
    """One record per (regime, method, eval set, metric), with the drop from the test split, the
    validation ECE of the method's head and the errors of its counts on the eval set."""
    records = []
    for regime in settings.regimes:
        for row in table_rows(settings):
            results = read_json(row_results(layout, row, regime))
            if not results:
                continue
            metrics, metric_prefix = results["metrics"], row.metric_prefix
            for eval_set in results["eval_sets"]:
                calibration = _calibration_fields(results, row_head(row), eval_set)
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


def missing_runs(layout: RunLayout, settings: ExperimentSettings) -> list[str]:
    """The evaluated runs the main table expects and the folder lacks (a stage not run yet)."""
    return [
        per_regime(prefix, regime)
        for regime in settings.regimes
        for prefix in dict.fromkeys(row.run for row in table_rows(settings))
        if not (layout.run(per_regime(prefix, regime)) / RESULTS).exists()
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
    if any(r["drop_from_test"] is not None for r in records):
        lines.append(
            "Out-of-distribution cells show, in brackets, the change from the test split of the "
            "same method (negative: a drop)."
        )
    return lines + [""]


def _diffusion_checkpoint(layout: RunLayout) -> tuple[Path, dict | None]:
    """The diffusion run's checkpoint folder and its ``last.ckpt`` loaded (None before it is
    trained), read once for the U-Net's blocks and the online probe's history."""
    last = layout.checkpoint("diffusion")
    return last.parent, load_checkpoint(last) if last.exists() else None


def _resolution_table(layout: RunLayout, regime: str, info: dict) -> list[str]:
    """Best validation macro-F1 per U-Net resolution, so it is plain which feature size wins."""
    table = layout.run(per_regime(probe_prefix("diffusion"), regime)) / PROBE_RESULTS
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


def _clustering_table(layout: RunLayout, settings: ExperimentSettings) -> list[str]:
    clustered = read_json(layout.clustering_split)  # {} in runs of earlier versions
    if clustered and clustered["split"] is None:
        return ["No evaluation set in the data: nothing was clustered.", ""]
    lines = []
    if clustered and clustered["split"] != clustered["requested"]:
        lines += [
            f"k-means on the `{clustered['split']}` split (the data has no "
            f"`{clustered['requested']}` images).",
            "",
        ]
    lines += ["| features | key | NMI | ARI | purity |", "|---|---|---|---|---|"]
    found = False
    for source in ("diffusion", *settings.baseline_names, "pixels"):
        path = layout.clustering(source) / "clustering.csv"
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


def _per_class_and_confusion(
    layout: RunLayout, settings: ExperimentSettings, records: list[dict], regime: str
) -> list[str]:
    best = best_run(layout, settings, records, regime)
    if best is None:
        return []
    method, folder = best
    results = read_json(folder / RESULTS)
    saved = np.load(folder / TEST_PREDICTIONS)
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
    save_figure(figure, layout.figures / "confusion_best.png")
    return lines + ["", "![confusion matrix](figures/confusion_best.png)", ""]


def _method_sections(settings: ExperimentSettings) -> dict[str, MethodSettings]:
    """The method sections of the settings, as written: diffusion, the baselines, the probes.
    The readouts have a blank row: their settings are in the readouts' table."""
    methods = {"diffusion": settings.diffusion or MethodSettings(), **settings.baselines}
    probes = settings.probes or ProbeSettings()
    for name in (f.name for f in fields(ProbeSettings)):
        section = getattr(probes, name)
        if name == "readouts" and section:
            methods["probe (readouts)"] = MethodSettings()
        elif name != "readouts" and section is not None:
            methods[f"probe ({name})"] = section
    return methods


def _settings(settings: ExperimentSettings) -> list[str]:
    """Each method's config and the experiment's changes to it."""
    lines = ["| method | config | epochs | changed settings |", "|---|---|---|---|"]
    for name, section in _method_sections(settings).items():
        changes = ", ".join(f"`{k}={v}`" for k, v in section.overrides.items())
        epochs = "" if section.max_epochs is None else section.max_epochs
        lines.append(
            f"| {name} | `{Path(section.config or '').name}` | {epochs} | {changes or 'none'} |"
        )
    shared = ", ".join(f"`{k}={v}`" for k, v in settings.trainer_overrides.items())
    return lines + [
        "",
        "Every run reads the shared `configs/trainer/default.yaml`"
        + (f", changed for this experiment: {shared}" if shared else "")
        + "; every method the same data config.",
        "",
    ]


def collapse_warnings(layout: RunLayout) -> list[str]:
    """One line per run whose encoder looked collapsed after its last epoch."""
    lines = []
    for path in sorted(layout.runs.glob(f"*/{COMPUTE}")):
        run = read_json(path)
        collapsed = (run.get("collapse") or {}).get("collapsed")
        if collapsed:
            lines.append(
                f"- **Warning: `{run['method']}` looks collapsed** after its last epoch "
                f"({'; '.join(collapsed)}): its probe rows measure an encoder that maps images "
                "to nearly the same features."
            )
    return lines


def _compute_table(layout: RunLayout) -> list[str]:
    lines = [
        "| run | regime | epochs | images seen | global batch | training GFLOP per image | "
        "training TFLOP | wall time (s) | trainable parameters | all parameters | precision | "
        "device |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    budgets = set()
    for path in sorted(layout.runs.glob(f"*/{COMPUTE}")):
        c = read_json(path)
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
    layout = RunLayout(Path(run_dir))
    if not layout.experiment.exists():
        raise FileNotFoundError(
            f"{layout.root} is not an experiment run folder (no experiment.json): "
            "run plankton experiment --config ... --out DIR first"
        )
    settings, _ = read_settings(layout.experiment)
    layout.figures.mkdir(exist_ok=True)
    records = collect_results(layout, settings)
    write_text_atomic(layout.root / "results.json", json.dumps(records, indent=2))
    rows = ([r[c] for c in COLUMNS] for r in records)
    write_csv_atomic(layout.root / "results.csv", COLUMNS, rows)
    lines = [
        *_summary(layout, settings, records),
        *_diffusion_features(layout, settings),
        *_section("k-means clustering", _clustering_table(layout, settings)),
        *_section(
            "Per-class F1 and confusion matrix",
            _per_class_and_confusion(layout, settings, records, settings.pretrain_regime),
        ),
        *counts_section(layout, settings, records),
        *_samples(layout),
        "## Settings and compute",
        "",
        *_settings(settings),
        *_compute_table(layout),
        *_stage_times(layout),
        "TensorBoard logs of every run are under `runs/`: "
        f"`tensorboard --logdir {layout.root}` (or `make tensorboard`).",
        "",
    ]
    write_text_atomic(layout.report, "\n".join(lines))
    return layout.report


def _section(title: str, lines: list[str]) -> list[str]:
    return ["## " + title, "", *lines] if lines else []


def _summary(layout: RunLayout, settings: ExperimentSettings, records: list[dict]) -> list[str]:
    """The title, the data of each regime, who pretrains on what, and the main tables with the
    warnings of collapsed encoders and runs not evaluated yet."""
    lines = [f"# Experiment `{settings.name or layout.root.name}`", ""]
    for regime in settings.regimes:
        summary = read_json(layout.data_summary(regime))
        if summary:
            counts = ", ".join(f"{s} {sum(c.values())}" for s, c in summary["counts"].items())
            lines.append(f"- **{regime}**: {len(summary['classes'])} classes; images: {counts}")
    lines += _absent_eval_sets(read_json(layout.data_summary(settings.regimes[0])))
    methods = [METHODS[m] for m in ("diffusion", *settings.baseline_names)]
    label_free = [m.display_name for m in methods if not m.per_regime]
    trained_per_regime = [m.display_name for m in methods if m.per_regime]
    lines += [
        f"- Label-free pretraining ({', '.join(label_free)}) on the {settings.pretrain_regime} "
        "training split; "
        + "".join(f"{name}, " for name in trained_per_regime)
        + "every linear probe trained per regime.",
        "",
        "## Main results",
        "",
        *_main_tables(records),
    ]
    warnings = collapse_warnings(layout)
    if warnings:
        lines += [*warnings, ""]
    missing = missing_runs(layout, settings)
    if missing:
        lines += [f"Not in the tables (not evaluated yet): {', '.join(missing)}.", ""]
    return lines


def _absent_eval_sets(summary: dict) -> list[str]:
    """One line when the data lacks a test split or any evaluation set (the same in every regime;
    none for runs of earlier versions, whose summaries do not list them)."""
    eval_sets = summary.get("eval_sets", ["test"])
    if "test" in eval_sets:
        return []
    if not eval_sets:
        return ["- **No evaluation set in the data**: the runs are trained, nothing is scored."]
    return [
        f"- **No test split in the data**: the tables show the evaluation sets it has "
        f"({', '.join(eval_sets)}); the drops from test, the per-class F1, the confusion matrix "
        "and the planted count check need it and are left out."
    ]


def _diffusion_features(layout: RunLayout, settings: ExperimentSettings) -> list[str]:
    """Per regime the probe's heatmaps, its best score per feature resolution and the readouts;
    then the online probe's curve."""
    lines = ["## Diffusion features: layers x timesteps", ""]
    checkpoints, last = _diffusion_checkpoint(layout)
    # The resolution of every U-Net block, for the table of the best probe per resolution.
    blocks = DiffusionModule.from_checkpoint(last).ema.info if last is not None else {}
    for regime in settings.regimes:
        folder = layout.run(per_regime(probe_prefix("diffusion"), regime))
        for metric in ("acc", "macro_f1"):
            heatmap = folder / f"probe_heatmap_val_{metric}.png"
            if heatmap.exists():
                shutil.copy(heatmap, layout.figures / f"heatmap_{regime}_{metric}.png")
                lines.append(f"![{regime} {metric}](figures/heatmap_{regime}_{metric}.png)")
        lines += ["", *_resolution_table(layout, regime, blocks)]
        lines += readouts_section(layout, settings, regime)
    return lines + online_probe_section(checkpoints, last)


def _samples(layout: RunLayout) -> list[str]:
    if not (layout.figures / "diffusion_samples.png").exists():
        return []
    return [
        "## Diffusion samples next to real images",
        "",
        "| samples (EMA weights, DDIM 50 steps) | real validation images |",
        "|---|---|",
        "| ![samples](figures/diffusion_samples.png) | ![real](figures/real_images.png) |",
        "",
    ]


def _stage_times(layout: RunLayout) -> list[str]:
    stages = [
        (stage, read_json(layout.stage_marker(stage))["wall_s"])
        for stage in STAGES
        if layout.stage_marker(stage).exists()
    ]
    if not stages:
        return []
    return [
        "| stage | wall time (s) |",
        "|---|---|",
        *(f"| {name} | {wall:.0f} |" for name, wall in stages),
        "",
    ]
