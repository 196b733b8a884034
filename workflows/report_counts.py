"""The report's section on calibration, unknowns and counts: every calibrated head's
temperature and rejection threshold, every classifier's error of the class fractions on each
labelled set, and the best method's estimated fraction of every class."""

from __future__ import annotations

from typing import NamedTuple

from lightning_modules.common.abundance import ESTIMATORS, PLANTED_DRAWS
from lightning_modules.common.figures import abundance_figure, save_figure

from .experiment_config import ExperimentSettings
from .layout import RESULTS, RunLayout, per_regime
from .report_rows import best_run, class_mix_shift, read_json, row_head, table_rows


def counts_section(
    layout: RunLayout, settings: ExperimentSettings, records: list[dict]
) -> list[str]:
    """The section's lines; [] for runs evaluated before classifiers were calibrated."""
    classifiers = _classifiers(layout, settings)
    counts = [
        *_calibration_table(classifiers),
        *_abundance_tables(classifiers),
        *_best_counts(layout, settings, records, settings.pretrain_regime),
    ]
    if not counts:
        return []
    return ["## Calibration, unknowns and counts under a change of class mix", "", *counts]


class Classifier(NamedTuple):
    """An evaluated classifier run: its regime, the label of each of its heads, its
    ``results.json``."""

    regime: str
    labels: dict[str, str]
    results: dict


def _classifiers(layout: RunLayout, settings: ExperimentSettings) -> list[Classifier]:
    """Every evaluated classifier run (an end-to-end method or a probe), its heads labelled as
    the main table's rows; a fusion head without a row of its own is its probe's + (fusion)."""
    rows = table_rows(settings)
    classifiers = []
    for regime in settings.regimes:
        for run in dict.fromkeys(row.run for row in rows):
            results = read_json(layout.run(per_regime(run, regime)) / RESULTS)
            if not results:
                continue
            labels: dict[str, str] = {}
            for row in rows:
                if row.run == run:
                    labels.setdefault(row_head(row), row.label)
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
    eval_sets = dict.fromkeys(name for c in counted for name in c.results["abundance"])
    test_note = (  # data split by season has no test split
        " `test`, held out from the training images, comes first as the in-distribution "
        "reference; the balanced regime caps the training images per class, so even test's "
        "class mix differs from its training's."
        if "test" in eval_sets
        else ""
    )
    lines = [
        "### Counts under a change of class mix",
        "",
        "Half the L1 distance between a set's true class fractions and those estimated from a "
        "classifier's calibrated predictions (0: exact; the share of images that would have to "
        "change class), lowest per row in bold. cc counts predicted classes; acc and pacc "
        "correct the (probabilistic) counts by the validation misclassification rates; emq "
        "re-estimates the class priors by EM (Saerens et al. 2002)." + test_note,
        "",
    ]
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
            shift = class_mix_shift(classifier.results, abundance)
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


def _best_counts(
    layout: RunLayout, settings: ExperimentSettings, records: list[dict], regime: str
) -> list[str]:
    """The best method's estimated fraction of every class on each out-of-distribution set,
    as a table and a figure of true against estimated fractions."""
    best = best_run(layout, settings, records, regime)
    if best is None:
        return []
    method, folder = best
    results = read_json(folder / RESULTS)
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
        save_figure(figure, layout.figures / f"abundance_{eval_set}.png")
        lines += [
            "",
            f"![true vs estimated fractions, {eval_set}](figures/abundance_{eval_set}.png)",
            "",
        ]
    return lines
