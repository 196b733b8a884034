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
from workflows.classify_sample import LoadedClassifier, Quantification, quantify, read_sample
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
    settings = command_settings(top_k, batch_size, estimators, reject, n_boot, samples=str(samples))
    provenance = Provenance.of(checkpoint, classifier, settings)
    outputs.predictions.parent.mkdir(parents=True, exist_ok=True)
    k = min(top_k, len(classifier.classes))
    predictions = _StagedCsv(outputs.predictions, ["sample_id", *prediction_header(k, reject)])
    skipped = _StagedCsv(outputs.skipped, ["sample_id", "path", "reason"])
    written: list[Path] = []
    try:
        summaries, counts = [], []
        for sample in found:
            run = _SampleRun(classifier, estimators, reject, n_boot, provenance)
            summaries.append(run.classify(sample, batch_size, top_k, predictions, skipped))
            counts += run.count_rows
            if sample.sample_id in outputs.ecotaxa and run.write_ecotaxa(outputs.ecotaxa):
                written.append(outputs.ecotaxa[sample.sample_id])
        _write_counts(outputs, counts, classifier.classes, reject)
        written += [outputs.counts, *outputs.wide.values()]
        provenance.write(outputs.provenance)
        predictions.commit()
        skipped.commit()
    except BaseException:
        predictions.discard()
        skipped.discard()
        for path in [*written, outputs.provenance]:
            path.unlink(missing_ok=True)
        raise
    return SurveyResult(summaries, outputs, str(classifier.device))


class _SampleRun:
    """One sample through the loaded classifier: its rows for the survey's files."""

    def __init__(
        self,
        classifier: LoadedClassifier,
        estimators: list[str],
        reject: bool,
        n_boot: int,
        provenance: Provenance,
    ) -> None:
        self.classifier, self.estimators, self.reject = classifier, estimators, reject
        self.n_boot, self.provenance = n_boot, provenance
        self.count_rows: list[list[object]] = []

    def classify(
        self,
        sample: Sample,
        batch_size: int,
        top_k: int,
        predictions: _StagedCsv,
        skipped: _StagedCsv,
    ) -> SampleSummary:
        """Predict and count ``sample``, appending its prediction and skipped rows."""
        self.sample = sample
        files = image_files(sample.folder)
        self.prediction = read_sample(self.classifier, sample.folder, files, batch_size, top_k)
        sample_id, prediction = sample.sample_id, self.prediction
        quantification = None
        if prediction.names:
            calibration = self.classifier.calibration
            quantification = quantify(
                prediction, calibration, self.estimators, self.reject, self.n_boot
            )
        self.labels = decisions(prediction, quantification) if quantification else None
        rows = prediction_rows(prediction, self.labels)
        predictions.append([[sample_id, *row] for row in rows])
        reasons = [[sample_id, name, reason] for name, reason in prediction.skipped]
        if not files:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            reasons.append([sample_id, "", f"no image files in the folder (suffixes {suffixes})"])
        skipped.append(reasons)
        self.count_rows = _count_rows(sample_id, prediction.classes, quantification, self)
        return SampleSummary(sample_id, len(prediction.names), len(prediction.skipped))

    def write_ecotaxa(self, tables: dict[str, Path]) -> bool:
        """The sample's EcoTaxa table, when it has a readable image; whether it was written."""
        if not self.prediction.names:
            return False
        sample_id = self.sample.sample_id
        process = self.provenance.ecotaxa_columns
        write_ecotaxa(tables[sample_id], self.prediction, self.labels, process, f"{sample_id}_")
        return True


def _count_rows(
    sample_id: str, classes: list[str], quantification: Quantification | None, run: _SampleRun
) -> list[list[object]]:
    """The long counts rows of one sample, every class in the classifier's order per estimator;
    a sample without a readable image counts zero with NaN fractions."""
    rows: list[list[object]] = []
    for name in run.estimators:
        if quantification is None:
            counts, estimates = np.zeros(len(classes), int), np.full((3, len(classes)), np.nan)
        else:
            counts, estimates = quantification.counts[name], quantification.estimates[name]
        for i, label in enumerate(classes):
            values = (f"{value:.4f}" for value in estimates[:, i])
            rows.append([sample_id, label, name, int(counts[i]), *values])
        if run.reject:
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
