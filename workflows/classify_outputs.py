"""The files a classified sample is written to: the predictions, the counts table, the unreadable
images, the provenance sidecar and, on request, an EcoTaxa import table next to the images."""

from __future__ import annotations

import errno
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from datamodules.store import staging_path, write_csv_atomic
from workflows.classify_provenance import Provenance
from workflows.classify_sample import Prediction, Quantification
from workflows.ecotaxa import PREFIX, SUFFIX, check_ecotaxa_name, write_ecotaxa_predictions

# The label of a rejected image, and its row in the counts table.
UNKNOWN = "unknown"
# The counts table's columns of each estimator, prefixed with its name (``pacc_fraction``).
ESTIMATE_COLUMNS = ("count", "fraction", "low", "high")


@dataclass(frozen=True)
class ClassifyOutputs:
    """The paths of one sample's outputs: ``predictions`` (``--out``), ``<stem>_counts.csv``,
    ``<stem>_skipped.csv`` and ``<stem>_provenance.json`` beside it, and ``ecotaxa_<stem>.tsv``
    in the image folder (None unless asked for)."""

    predictions: Path
    counts: Path
    skipped: Path
    provenance: Path
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
            provenance=out.with_name(f"{out.stem}_provenance.json"),
            ecotaxa=check_ecotaxa_name(images / f"{PREFIX}{out.stem}{SUFFIX}") if ecotaxa else None,
        )

    @property
    def paths(self) -> list[Path]:
        """Every file that will be written, ``predictions`` first."""
        paths = (self.predictions, self.counts, self.skipped, self.provenance, self.ecotaxa)
        return [path for path in paths if path is not None]

    def check(self, overwrite: bool) -> None:
        """``check_outputs`` of every path."""
        check_outputs(self.paths, overwrite)


def check_outputs(paths: Iterable[Path], overwrite: bool) -> None:
    """Before any image is read: refuse to write over a folder or (without ``overwrite``) any
    existing file, as a mistyped ``--out`` must not replace someone's data; and make sure every
    output's folder can be created and written (a read-only folder found after hours of
    classifying wastes them)."""
    paths = list(paths)
    for path in paths:
        if path.is_dir():
            raise ValueError(f"{path} is a folder; name a file with --out")
        if path.exists() and not overwrite:
            raise FileExistsError(
                f"{path} exists; choose another --out or pass --overwrite to replace it"
            )
    for folder in dict.fromkeys(path.parent for path in paths):
        _check_writable(folder)


def _check_writable(folder: Path) -> None:
    """Raise the OSError that says why ``folder`` cannot be written, naming it: a file is
    created and removed at once in it, or in its nearest existing parent if it is yet to be
    made (nothing is left behind if the run fails later)."""
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(existing))
        probe = staging_path(existing / "write-check")
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(folder)) from None


def write_outputs(
    outputs: ClassifyOutputs,
    prediction: Prediction,
    quantification: Quantification,
    provenance: Provenance,
) -> None:
    """Write every file of ``outputs``, each atomically, all or none: when one fails, those
    this call wrote are removed, so a re-run is not refused for a half set of outputs."""
    outputs.predictions.parent.mkdir(parents=True, exist_ok=True)
    labels = decisions(prediction, quantification)
    writers = [(outputs.predictions, lambda path: write_predictions(path, prediction, labels))]
    writers.append(
        (outputs.counts, lambda path: write_counts(path, prediction.classes, quantification))
    )
    writers.append((outputs.skipped, lambda path: write_skipped(path, prediction)))
    writers.append((outputs.provenance, provenance.write))
    if outputs.ecotaxa:  # first: it checks the most
        process = provenance.ecotaxa_columns
        table = (outputs.ecotaxa, lambda path: write_ecotaxa(path, prediction, labels, process))
        writers.insert(0, table)
    written: list[Path] = []
    try:
        for path, write in writers:
            write(path)
            written.append(path)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise


def write_skipped(path: Path, prediction: Prediction) -> None:
    """The images that could not be read, with the reason."""
    write_csv_atomic(path, ["path", "reason"], prediction.skipped)


def write_ecotaxa(
    path: Path,
    prediction: Prediction,
    labels: list[str] | None,
    process: dict[str, str],
    id_prefix: str = "",
) -> None:
    """The EcoTaxa import table of the sample (status ``predicted``), next to its images, with
    the ``process`` columns; ``id_prefix`` (a survey's sample id) keeps object ids unique across
    the samples imported into one project."""
    write_ecotaxa_predictions(
        path,
        prediction.names,
        prediction.classes,
        prediction.probabilities,
        top_k=prediction.top_k,
        object_ids=[id_prefix + name for name in _object_ids(prediction.names)],
        labels=labels,
        process=process,
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
    write_csv_atomic(
        path,
        prediction_header(prediction.top_k, labels is not None),
        prediction_rows(prediction, labels),
    )


def prediction_header(top_k: int, labelled: bool) -> list[str]:
    """The columns of ``write_predictions``: ``label`` only when ``labelled`` (rejection)."""
    header = ["path", "label"] if labelled else ["path"]
    return header + [f"{kind}_{i}" for i in range(1, top_k + 1) for kind in ("label", "prob")]


def prediction_rows(prediction: Prediction, labels: list[str] | None) -> list[list[str]]:
    """The rows of ``write_predictions``, one per image."""
    classes = prediction.classes
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
    return rows


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
