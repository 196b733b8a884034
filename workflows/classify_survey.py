"""Classifying a survey: many samples (one folder each) through one loaded classifier.

An instrument writes one sample every few minutes to hours, and what ecologists publish is a
table of samples x classes. ``classify_samples`` loads the checkpoint once, runs each sample
through the same steps as ``classify_folder`` (``read_sample``, then ``quantify``) and writes:

- ``<stem>.csv``: the predictions of every image, ``sample_id`` first, then the columns of a
  single sample's predictions;
- ``<stem>_samples_counts.csv``: the long table ``sample_id,class,estimator,count,fraction,low,
  high``, every class of every sample in the classifier's class order (plus an ``unknown`` row
  per estimator with rejection);
- ``<stem>_samples_counts_<estimator>.csv``: per requested estimator, one row per sample and one
  column of counts per class;
- ``<stem>_skipped.csv``: ``sample_id,path,reason`` of every unreadable file, and of every sample
  folder without image files (``path`` empty);
- ``<stem>_provenance.json``; and with ``ecotaxa``, one EcoTaxa table per sample folder.

``--out`` names the predictions file, or a folder that then holds ``predictions.csv``,
``samples_counts.csv``, ``samples_counts_<estimator>.csv``, ``skipped.csv`` and
``provenance.json``. Prediction and skipped rows are appended to staging files as each sample
finishes and renamed into place at the end, so memory holds one sample's images and the count
rows, whatever the number of samples.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TextIO

import numpy as np
import torch

from datamodules.preprocessing import IMAGE_SUFFIXES
from datamodules.store import staging_path, write_csv_atomic
from workflows.classify import (
    calibration_needs,
    check_settings,
    image_files,
    open_classifier,
)
from workflows.classify_outputs import (
    ESTIMATE_COLUMNS,
    UNKNOWN,
    check_outputs,
    decisions,
    prediction_header,
    prediction_rows,
    write_ecotaxa,
)
from workflows.classify_provenance import Provenance, command_settings
from workflows.classify_sample import (
    LoadedClassifier,
    Prediction,
    Quantification,
    quantify,
    read_sample,
)
from workflows.ecotaxa import PREFIX, SUFFIX, check_ecotaxa_name

# The manifest's columns: a sample's id and its image folder.
MANIFEST_COLUMNS = ("sample_id", "path")
# The long counts table's columns.
COUNT_COLUMNS = ("sample_id", "class", "estimator", *ESTIMATE_COLUMNS)


class Sample(NamedTuple):
    """One sample of a survey: its id and the folder of its images."""

    sample_id: str
    folder: Path


def survey_samples(samples: str | Path) -> list[Sample]:
    """The samples of ``--samples``: each immediate, non-hidden subfolder of a folder (the id is
    its name, sorted), or the rows of a ``.csv`` manifest with the columns ``sample_id,path``
    (a path relative to the manifest's folder, or absolute), in the manifest's order.

    Raises:
        FileNotFoundError: ``samples``, or a folder the manifest names, is missing.
        ValueError: no sample, a manifest without its columns, an empty or repeated id.
    """
    samples = Path(samples)
    if samples.is_dir():
        found = [
            Sample(path.name, path)
            for path in sorted(samples.iterdir())
            if path.is_dir() and not path.name.startswith(".")
        ]
    elif samples.is_file() and samples.suffix.lower() == ".csv":
        found = _manifest_samples(samples)
    else:
        raise FileNotFoundError(
            f"--samples {samples} is neither a folder of sample folders nor a .csv manifest"
        )
    if not found:
        raise ValueError(f"--samples {samples} holds no sample folder")
    ids = [sample.sample_id for sample in found]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"--samples {samples}: sample id {repeated[0]!r} is given more than once")
    return found


def _manifest_samples(manifest: Path) -> list[Sample]:
    with open(manifest, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"manifest {manifest} lacks the column(s) {', '.join(missing)}: it needs "
                f"{','.join(MANIFEST_COLUMNS)}"
            )
        rows = list(reader)
    found = []
    for line, row in enumerate(rows, start=2):
        sample_id, path = (row["sample_id"] or "").strip(), (row["path"] or "").strip()
        if not sample_id or not path:
            raise ValueError(f"manifest {manifest}, line {line}: sample_id and path are needed")
        folder = manifest.parent / path  # an absolute path stays itself
        if not folder.is_dir():
            raise FileNotFoundError(
                f"manifest {manifest}, line {line}: the folder {folder} of sample {sample_id!r} "
                "does not exist"
            )
        found.append(Sample(sample_id, folder))
    return found


@dataclass(frozen=True)
class SurveyOutputs:
    """The paths of a survey's outputs (see the module's docstring for the names)."""

    predictions: Path
    counts: Path
    wide: dict[str, Path]
    skipped: Path
    provenance: Path
    ecotaxa: dict[str, Path]

    @classmethod
    def of(
        cls, out: Path, samples: list[Sample], estimators: list[str], ecotaxa: bool
    ) -> SurveyOutputs:
        """The outputs of ``--out out``: a ``.csv`` file, or a folder (no suffix, or one that
        exists)."""
        if out.suffix.lower() == ".csv":
            predictions, prefix = out, f"{out.stem}_"
        elif out.suffix and not out.is_dir():
            raise ValueError(f"--out {out} must name a .csv file or a folder")
        else:
            predictions, prefix = out / "predictions.csv", ""
        folder = predictions.parent
        tables = {}
        if ecotaxa:
            name = f"{PREFIX}{predictions.stem}{SUFFIX}"
            tables = {s.sample_id: check_ecotaxa_name(s.folder / name) for s in samples}
        return cls(
            predictions=predictions,
            counts=folder / f"{prefix}samples_counts.csv",
            wide={name: folder / f"{prefix}samples_counts_{name}.csv" for name in estimators},
            skipped=folder / f"{prefix}skipped.csv",
            provenance=folder / f"{prefix}provenance.json",
            ecotaxa=tables,
        )

    @property
    def paths(self) -> list[Path]:
        """Every file that will be written, ``predictions`` first."""
        tables = [*self.wide.values(), self.skipped, self.provenance, *self.ecotaxa.values()]
        return [self.predictions, self.counts, *tables]


@dataclass(frozen=True)
class SampleSummary:
    """What one sample of a survey gave: its images classified and its unreadable files."""

    sample_id: str
    images: int
    skipped: int


@dataclass(frozen=True)
class SurveyResult:
    """The samples classified, in order, the files written and where the images were read."""

    samples: list[SampleSummary]
    outputs: SurveyOutputs
    device: str


class _StagedCsv:
    """A CSV written row by row under its staging name and renamed into place by ``commit``:
    a run that stops leaves no partial file under the final name."""

    def __init__(self, path: Path, header: Sequence[str]) -> None:
        self.path, self.staging = path, staging_path(path)
        self.handle: TextIO = open(self.staging, "w", newline="")  # noqa: SIM115 (closed below)
        self.writer = csv.writer(self.handle, lineterminator="\n")
        self.writer.writerow(header)

    def append(self, rows: list[Sequence[object]]) -> None:
        self.writer.writerows(rows)
        self.handle.flush()  # each sample's rows reach the disk when it finishes

    def commit(self) -> None:
        self.handle.close()
        os.replace(self.staging, self.path)

    def discard(self) -> None:
        self.handle.close()
        self.staging.unlink(missing_ok=True)


def classify_samples(
    checkpoint: str | Path,
    samples: str | Path,
    out: str | Path,
    top_k: int = 3,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    abundance: str | Sequence[str] = ("cc",),
    reject: bool = False,
    ecotaxa: bool = False,
    n_boot: int = 200,
) -> SurveyResult:
    """Classify every sample of ``samples`` (``survey_samples``) with the checkpoint loaded once,
    as ``classify_folder`` classifies one folder: each sample's predictions and counts are
    exactly those ``classify_folder`` gives for its folder. A sample folder without a readable
    image is listed in the skipped file and counted zero (fractions NaN), not an error.

    Every option, the calibration it needs, and every output (none may exist unless
    ``overwrite``; every folder must be writable) are checked before any image is read.
    """
    found = survey_samples(samples)
    estimators = check_settings(top_k, batch_size, n_boot, abundance)
    outputs = SurveyOutputs.of(Path(out), found, estimators, ecotaxa)
    check_outputs(outputs.paths, overwrite)
    classifier = open_classifier(checkpoint, device, calibration_needs(estimators, reject))
    settings = SurveySettings(top_k, batch_size, estimators, reject, n_boot)
    provenance = Provenance.of(
        checkpoint,
        classifier,
        command_settings(top_k, batch_size, estimators, reject, n_boot, samples=str(samples)),
    )
    summaries = _write_survey(outputs, found, classifier, settings, provenance)
    return SurveyResult(summaries, outputs, str(classifier.device))


def _write_survey(
    outputs: SurveyOutputs,
    found: list[Sample],
    classifier: LoadedClassifier,
    settings: SurveySettings,
    provenance: Provenance,
) -> list[SampleSummary]:
    """Classify the samples one after the other, streaming their prediction and skipped rows
    and writing each EcoTaxa table as its sample finishes; the counts tables and the provenance
    come last. When anything fails, no output of the run is left."""
    outputs.predictions.parent.mkdir(parents=True, exist_ok=True)
    k, reject = min(settings.top_k, len(classifier.classes)), settings.reject
    predictions = _StagedCsv(outputs.predictions, ["sample_id", *prediction_header(k, reject)])
    skipped = _StagedCsv(outputs.skipped, ["sample_id", "path", "reason"])
    written: list[Path] = []
    try:
        summaries, counts = [], []
        for sample in found:
            result = classify_sample(classifier, sample, settings)
            predictions.append(_prediction_rows(result))
            skipped.append(_skipped_rows(result))
            counts += _count_rows(result, classifier.classes, settings)
            table = outputs.ecotaxa.get(sample.sample_id)
            if table and result.prediction.names:  # a table of no object imports nothing
                process = provenance.ecotaxa_columns
                write_ecotaxa(
                    table, result.prediction, result.labels, process, f"{sample.sample_id}_"
                )
                written.append(table)
            summaries.append(result.summary)
        _write_counts(outputs, counts, classifier.classes, reject)
        written += [outputs.counts, *outputs.wide.values()]
        provenance.write(outputs.provenance)
        written.append(outputs.provenance)
        predictions.commit()
        skipped.commit()
    except BaseException:
        predictions.discard()
        skipped.discard()
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return summaries


@dataclass(frozen=True)
class SurveySettings:
    """The command's settings that every sample of a survey is classified with."""

    top_k: int
    batch_size: int
    estimators: list[str]
    reject: bool
    n_boot: int


@dataclass(frozen=True)
class SampleResult:
    """One sample through the classifier: its prediction, its quantification (None when no
    image was readable) and each image's label (None without rejection)."""

    sample: Sample
    prediction: Prediction
    quantification: Quantification | None
    labels: list[str] | None

    @property
    def summary(self) -> SampleSummary:
        prediction = self.prediction
        return SampleSummary(self.sample.sample_id, len(prediction.names), len(prediction.skipped))


def classify_sample(
    classifier: LoadedClassifier, sample: Sample, settings: SurveySettings
) -> SampleResult:
    """Predict and quantify one sample of a survey, as ``classify_folder`` does its folder."""
    files = image_files(sample.folder)
    prediction = read_sample(classifier, sample.folder, files, settings.batch_size, settings.top_k)
    if not prediction.names:
        return SampleResult(sample, prediction, None, None)
    quantification = quantify(
        prediction, classifier.calibration, settings.estimators, settings.reject, settings.n_boot
    )
    return SampleResult(sample, prediction, quantification, decisions(prediction, quantification))


def _prediction_rows(result: SampleResult) -> list[list[str]]:
    """The sample's rows of the predictions file: its id, then a single sample's columns."""
    rows = prediction_rows(result.prediction, result.labels)
    return [[result.sample.sample_id, *row] for row in rows]


def _skipped_rows(result: SampleResult) -> list[list[str]]:
    """The sample's unreadable files; a folder without image files is one row of empty path."""
    sample_id, prediction = result.sample.sample_id, result.prediction
    rows = [[sample_id, name, reason] for name, reason in prediction.skipped]
    if not prediction.names and not prediction.skipped:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        rows.append([sample_id, "", f"no image files in the folder (suffixes {suffixes})"])
    return rows


def _count_rows(
    result: SampleResult, classes: list[str], settings: SurveySettings
) -> list[list[object]]:
    """The long counts rows of one sample, every class in the classifier's order per estimator;
    a sample without a readable image counts zero with NaN fractions."""
    sample_id, quantification = result.sample.sample_id, result.quantification
    rows: list[list[object]] = []
    for name in settings.estimators:
        if quantification is None:
            counts, estimates = np.zeros(len(classes), int), np.full((3, len(classes)), np.nan)
        else:
            counts, estimates = quantification.counts[name], quantification.estimates[name]
        for i, label in enumerate(classes):
            values = (f"{value:.4f}" for value in estimates[:, i])
            rows.append([sample_id, label, name, int(counts[i]), *values])
        if settings.reject:
            unknown = quantification.unknown if quantification else 0
            rows.append([sample_id, UNKNOWN, name, unknown, "", "", ""])
    return rows


def _write_counts(
    outputs: SurveyOutputs, rows: list[list[object]], classes: list[str], reject: bool
) -> None:
    """The long counts table and, per estimator, its samples x classes matrix of counts."""
    write_csv_atomic(outputs.counts, COUNT_COLUMNS, rows)
    columns = [*classes, UNKNOWN] if reject else classes
    for name, path in outputs.wide.items():
        matrix: dict[str, dict[str, object]] = {}
        for sample_id, label, estimator, count, *_ in rows:
            if estimator == name:
                matrix.setdefault(sample_id, {})[label] = count
        table = [[sample_id, *(counts[c] for c in columns)] for sample_id, counts in matrix.items()]
        write_csv_atomic(path, ["sample_id", *columns], table)
