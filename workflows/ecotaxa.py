"""A classifier's predictions as an EcoTaxa import table, so ecologists validate them in EcoTaxa.

The rules this writer follows, from EcoTaxa's import help "How to prepare data" (shown on the
import page of ecotaxa.obs-vlfr.fr; repository ecotaxa/ecotaxa_front, the import job's shared
doc template and the example tables it links) and from EcoTaxa's importer (repository
ecotaxa/ecotaxa_back, ``TSVFile`` and ``Bundle``):

- the table is tab-separated and its name starts with ``ecotaxa`` (``ecotaxa*.tsv``; the
  importer globs exactly that, case-sensitively); we require the usual ``ecotaxa_*.tsv``;
- line 1 holds the column names, line 2 their types, ``[f]`` (float) or ``[t]`` (text), line 3
  onwards one image each;
- names are ``<level>_<field>``, split at the first ``_``, with the level one of ``img``,
  ``object``, ``sample``, ``acq`` and ``process``; the importer lower-cases them;
- ``img_file_name`` and ``object_id`` are mandatory; ``object_id`` is unique in the project;
  ``img_file_name`` is relative to the table's folder;
- ``object_annotation_status`` is ``predicted``, ``dubious`` or ``validated``; a predicted
  object needs an ``object_annotation_category``, which may name its parent (``Cnidaria<Hydrozoa``);
- free ``object_*`` columns: up to 500 ``[f]`` and 20 ``[t]`` ones per project;
- values are read with Python's csv module (``"`` quotes) and ``float()``: decimal point, no
  thousands separator; an empty cell is NULL (never written here: every image has its top-k);
- the file is read as Latin-1 unless it starts with a UTF-8 byte-order mark.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from datamodules.store import write_text_atomic

PREFIX = "ecotaxa_"
SUFFIX = ".tsv"
STATUS = "predicted"
# EcoTaxa's limit on free text columns of objects: each of the top-k adds one.
MAX_TEXT_COLUMNS = 20
_BOM = "\ufeff"


def check_ecotaxa_name(path: str | Path) -> Path:
    """``path`` if EcoTaxa would import a table of that name, else a ``ValueError`` saying which
    name to use. Callers check it before a long classification run, not after."""
    path = Path(path)
    if not (path.name.startswith(PREFIX) and path.name.endswith(SUFFIX)):
        stem = path.name.removesuffix(SUFFIX).removeprefix(PREFIX)
        raise ValueError(
            f"{path}: EcoTaxa imports only tables named {PREFIX}*{SUFFIX} (lower case); name it "
            f"e.g. {path.with_name(f'{PREFIX}{stem}{SUFFIX}')}"
        )
    return path


def ecotaxa_columns(top_k: int, process: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """The header row and the type row of a table with ``top_k`` ranked predictions, then the
    text columns named in ``process``."""
    header = [
        "img_file_name",
        "object_id",
        "object_annotation_category",
        "object_annotation_status",
    ]
    types = ["[t]"] * len(header)
    for rank in range(1, top_k + 1):
        header += [f"object_pred_{rank}_category", f"object_pred_{rank}_score"]
        types += ["[t]", "[f]"]
    process = list(process)
    return header + process, types + ["[t]"] * len(process)


def write_ecotaxa_predictions(
    path: str | Path,
    files: list[str],
    class_names: list[str],
    probabilities: np.ndarray | torch.Tensor,
    top_k: int = 3,
    object_ids: list[str] | None = None,
    labels: list[str] | None = None,
    process: dict[str, str] | None = None,
) -> Path:
    """Write ``path``, an EcoTaxa import table of one row per image, atomically; return it.

    Args:
        path: ``ecotaxa_*.tsv``, in the folder the image paths are relative to (EcoTaxa and
            ``datamodules.sources`` read them from the table's folder).
        files: image paths relative to the table's folder, with ``/`` separators (classify's
            ``file.relative_to(root).as_posix()``); every one must exist.
        class_names: the classifier's classes, in the order of the probability columns; they
            are written as they are, so they should be EcoTaxa category names.
        probabilities: ``(len(files), len(class_names))`` probabilities (after softmax).
        top_k: ranked predictions per image, ``object_pred_<rank>_category`` and
            ``object_pred_<rank>_score``, highest first.
        object_ids: EcoTaxa's ``object_id``, unique in the project; default the file stems.
            Importing several samples into one project needs ids that differ across samples
            (e.g. prefixed with the sample name).
        labels: the ``object_annotation_category`` of each image (e.g. ``unknown`` for a
            rejected one); default the top-1 class. The status stays ``predicted``.
        process: ``process_*`` columns and their one value for every image (what processed
            the sample: the model's checksum, the software's version).

    Raises:
        ValueError: a wrong file name, lengths or shapes that do not match, duplicate or empty
            object ids or labels, a ``top_k`` out of range, probabilities that are not finite
            numbers in [0, 1], or an image missing next to the table.
    """
    path = check_ecotaxa_name(path)
    process = _checked_process(process or {})
    scores = _checked_scores(probabilities, len(files), len(class_names), top_k)
    object_ids = [PurePosixPath(f).stem for f in files] if object_ids is None else object_ids
    _check_column("object_ids", object_ids, len(files))
    duplicates = [i for i, count in Counter(object_ids).items() if count > 1]
    if duplicates:
        raise ValueError(
            f"object_id {duplicates[0]!r} is given to several images ({len(duplicates)} ids "
            "repeated); EcoTaxa needs one id per object: pass unique object_ids"
        )
    missing = [f for f in files if not (path.parent / f).is_file()]
    if missing:
        raise ValueError(
            f"{len(missing)} image(s) not found relative to {path.parent}, e.g. {missing[0]!r}; "
            "EcoTaxa reads img_file_name from the table's folder: write the table there"
        )
    # A stable sort: tied scores keep the class order, so the table does not depend on the run.
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    labels = [class_names[row[0]] for row in ranked] if labels is None else labels
    _check_column("labels", labels, len(files))
    objects = zip(files, object_ids, labels, strict=True)
    text = _table(top_k, objects, class_names, scores, ranked, process)
    # EcoTaxa reads Latin-1 unless the file starts with a UTF-8 mark: a class name with an
    # accent needs the mark, a plain ASCII table stays readable by older importers without it.
    write_text_atomic(path, text if text.isascii() else _BOM + text)
    return path


def _checked_scores(
    probabilities: np.ndarray | torch.Tensor, n: int, classes: int, top_k: int
) -> np.ndarray:
    """``probabilities`` as a float array, once its shape (``n`` files by ``classes``), its
    values and ``top_k`` are checked."""
    if isinstance(probabilities, torch.Tensor):
        # float32 holds a score to 7 digits; numpy has no bfloat16
        probabilities = probabilities.detach().float().cpu().numpy()
    scores = np.asarray(probabilities)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if scores.shape != (n, classes):
        raise ValueError(
            f"probabilities have shape {tuple(scores.shape)}; expected ({n}, {classes}): one row "
            "per file and one column per class"
        )
    if not 1 <= top_k <= min(classes, MAX_TEXT_COLUMNS):
        raise ValueError(
            f"top_k={top_k} must be between 1 and the number of classes ({classes}), and at most "
            f"{MAX_TEXT_COLUMNS}, the number of free text columns EcoTaxa allows"
        )
    if not (np.isfinite(scores).all() and (scores >= 0).all() and (scores <= 1).all()):
        raise ValueError("probabilities must be finite and in [0, 1]: pass softmax outputs")
    return scores


def _table(
    top_k: int,
    objects: Iterable[tuple[str, str, str]],
    class_names: list[str],
    scores: np.ndarray,
    ranked: np.ndarray,
    process: dict[str, str],
) -> str:
    """The table's text: the header and type rows, then per object (file, id, label) its
    ranked predictions and the ``process`` values."""
    header, types = ecotaxa_columns(top_k, process)
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(header)
    writer.writerow(types)
    for (file, object_id, label), row, order in zip(objects, scores, ranked, strict=True):
        line = [file, object_id, label, STATUS]
        for index in order:
            # the shortest text that reads back as the same number, never in exponent notation
            line += [class_names[index], np.format_float_positional(row[index], trim="-")]
        writer.writerow(line + list(process.values()))
    return buffer.getvalue()


def _checked_process(process: dict[str, str]) -> dict[str, str]:
    """``process`` once every name is a lower-case ``process_*`` column and every value is
    given (EcoTaxa reads an empty cell as NULL)."""
    for name, value in process.items():
        if not (name.startswith("process_") and name == name.lower()):
            raise ValueError(f"{name!r} is not a process column: name it process_<field>")
        if not str(value).strip():
            raise ValueError(f"{name} is empty; EcoTaxa needs a value for every image")
    return {name: str(value) for name, value in process.items()}


def _check_column(name: str, values: list[str], n: int) -> None:
    if len(values) != n:
        raise ValueError(f"{len(values)} {name} for {n} files: give one per file")
    empty = [i for i, value in enumerate(values) if not value.strip()]
    if empty:
        raise ValueError(f"{name}[{empty[0]}] is empty; EcoTaxa needs a value for every image")
