"""The files a classified sample is written to: the predictions, the counts table, the unreadable
images and, on request, an EcoTaxa import table next to the images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from datamodules.store import write_csv_atomic
from workflows.classify_sample import Prediction, Quantification
from workflows.ecotaxa import PREFIX, SUFFIX, check_ecotaxa_name, write_ecotaxa_predictions

# The label of a rejected image, and its row in the counts table.
UNKNOWN = "unknown"
# The counts table's columns of each estimator, prefixed with its name (``pacc_fraction``).
ESTIMATE_COLUMNS = ("count", "fraction", "low", "high")


@dataclass(frozen=True)
class ClassifyOutputs:
    """The paths of one sample's outputs: ``predictions`` (``--out``), ``<stem>_counts.csv`` and
    ``<stem>_skipped.csv`` beside it, and ``ecotaxa_<stem>.tsv`` in the image folder (None
    unless asked for)."""

    predictions: Path
    counts: Path
    skipped: Path
    ecotaxa: Path | None = None

    @classmethod
    def of(cls, out: Path, images: Path, ecotaxa: bool) -> ClassifyOutputs:
        """The outputs of ``--out out`` for the sample in ``images``; ``out`` must be a CSV."""
        if out.suffix.lower() != ".csv":
            raise ValueError(f"--out {out} must name a .csv file")
        return cls(
            predictions=out,
            counts=out.with_name(f"{out.stem}_counts.csv"),
            skipped=out.with_name(f"{out.stem}_skipped.csv"),
            ecotaxa=check_ecotaxa_name(images / f"{PREFIX}{out.stem}{SUFFIX}") if ecotaxa else None,
        )

    @property
    def paths(self) -> list[Path]:
        """Every file that will be written, ``predictions`` first."""
        paths = (self.predictions, self.counts, self.skipped, self.ecotaxa)
        return [path for path in paths if path is not None]

    def check(self, overwrite: bool) -> None:
        """Refuse to write over a folder or (without ``overwrite``) any existing file: a
        mistyped ``--out`` must not replace someone's data."""
        for path in self.paths:
            if path.is_dir():
                raise ValueError(f"{path} is a folder; name a file with --out")
            if path.exists() and not overwrite:
                raise FileExistsError(
                    f"{path} exists; choose another --out or pass --overwrite to replace it"
                )


def write_outputs(
    outputs: ClassifyOutputs, prediction: Prediction, quantification: Quantification
) -> None:
    """Write every file of ``outputs``, each atomically."""
    outputs.predictions.parent.mkdir(parents=True, exist_ok=True)
    labels = decisions(prediction, quantification)
    write_predictions(outputs.predictions, prediction, labels)
    write_counts(outputs.counts, prediction.classes, quantification)
    write_csv_atomic(outputs.skipped, ["path", "reason"], prediction.skipped)
    if outputs.ecotaxa:
        write_ecotaxa_predictions(
            outputs.ecotaxa,
            prediction.names,
            prediction.classes,
            prediction.probabilities,
            top_k=prediction.top_k,
            object_ids=_object_ids(prediction.names),
            labels=labels,
        )


def decisions(prediction: Prediction, quantification: Quantification) -> list[str] | None:
    """Each image's label, ``unknown`` when rejected; None without rejection, when the label
    is the top-1 class."""
    if quantification.rejected is None:
        return None
    return [
        UNKNOWN if rejected else prediction.classes[i]
        for rejected, i in zip(quantification.rejected, prediction.predicted, strict=True)
    ]


def write_predictions(path: Path, prediction: Prediction, labels: list[str] | None) -> None:
    """One row per image: its path, its label (a ``label`` column only when ``labels`` are
    given, as only rejection makes them differ from ``label_1``), and its top-k classes with
    their probabilities, highest first."""
    classes = prediction.classes
    header = ["path"] if labels is None else ["path", "label"]
    header += [f"{kind}_{i}" for i in range(1, prediction.top_k + 1) for kind in ("label", "prob")]
    rows = []
    for name, label, top_values, top_classes in zip(
        prediction.names,
        [None] * len(prediction.names) if labels is None else labels,
        prediction.top_probabilities,
        prediction.top_classes,
        strict=True,
    ):
        row = [name] if label is None else [name, label]
        for value, index in zip(top_values.tolist(), top_classes.tolist(), strict=True):
            row += [classes[index], f"{value:.4f}"]
        rows.append(row)
    write_csv_atomic(path, header, rows)


def write_counts(path: Path, classes: list[str], quantification: Quantification) -> None:
    """The counts table: one row per class in ``quantification.order``, with the columns of
    ``ESTIMATE_COLUMNS`` per estimator; with rejection, a last ``unknown`` row gives the
    number rejected (its fraction cells are empty)."""
    estimators = quantification.estimators
    table = []
    for i in quantification.order:
        row = [classes[i]]
        for name in estimators:
            estimates = quantification.estimates[name][:, i]
            row += [quantification.counts[name][i], *(f"{value:.4f}" for value in estimates)]
        table.append(row)
    if quantification.rejected is not None:
        table.append([UNKNOWN] + [quantification.unknown, "", "", ""] * len(estimators))
    columns = [f"{name}_{column}" for name in estimators for column in ESTIMATE_COLUMNS]
    write_csv_atomic(path, ["class", *columns], table)


def _object_ids(names: list[str]) -> list[str]:
    """EcoTaxa object ids unique within the sample: the relative path without its suffix, as
    file stems repeat across subfolders (``night/0001.png``, ``day/0001.png``)."""
    return [PurePosixPath(name).with_suffix("").as_posix().replace("/", "_") for name in names]
