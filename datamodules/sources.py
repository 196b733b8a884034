"""Scanning the dataset layouts plankton labs use into one list of labelled image records.

Layouts:
- ``folder``: ``root/<class>/**/*.png|jpg|tif`` (class folders, the most common export);
- ``whoi``: ``root/<year>/<class>/*.png`` (WHOI-Plankton), train and test chosen by year;
- ``manifest``: a CSV with ``path,label`` and optional ``split``, ``domain`` and metadata columns;
- ``ecotaxa``: an EcoTaxa export TSV (``img_file_name``, ``object_annotation_category``).

A scan never decodes images (that is the cache's job), but it lists every file it cannot use.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .preprocessing import IMAGE_SUFFIXES

SourceFormat = Literal["auto", "folder", "whoi", "manifest", "ecotaxa"]
# Split values a source may fix. ``trainval`` (WHOI training years) leaves train/val to the
# splitter but never gives the image to test.
FIXED_SPLITS = ("train", "val", "test")
TRAINVAL = "trainval"
_YEAR = re.compile(r"^\d{4}$")


@dataclass
class ImageRecord:
    """One labelled image. ``key`` is its path relative to the source, the input of the split
    hash, so splits do not change when the dataset moves to another disk."""

    path: Path
    key: str
    label: str
    split: str | None = None
    domain: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class Skipped:
    path: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass
class Scan:
    records: list[ImageRecord]
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def detect_format(path: Path) -> SourceFormat:
    """Guess the layout of ``path``: a CSV, a TSV, WHOI year folders or class folders."""
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "manifest"
        if path.suffix.lower() == ".tsv":
            return "ecotaxa"
        raise ValueError(
            f"{path}: a data file must be a CSV manifest (.csv) or an EcoTaxa export (.tsv)"
        )
    subfolders = [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]
    if subfolders and all(_YEAR.match(p.name) for p in subfolders):
        return "whoi"
    return "folder"


def scan(
    path: str | Path,
    format: SourceFormat = "auto",
    train_years: list[str] | None = None,
    test_years: list[str] | None = None,
) -> Scan:
    """Scan one dataset source. Raises ``FileNotFoundError`` naming the path when it is missing."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset path {path} does not exist: check the data source")
    format = detect_format(path) if format == "auto" else format
    if format == "folder":
        return scan_class_folders(path)
    if format == "whoi":
        return scan_whoi(path, train_years, test_years)
    if format == "manifest":
        return scan_table(path, ",", "path", "label")
    if format == "ecotaxa":
        return scan_table(path, "\t", "img_file_name", "object_annotation_category")
    raise ValueError(f"unknown format {format!r}: use auto, folder, whoi, manifest or ecotaxa")


def scan_class_folders(root: Path, key_prefix: str = "", split: str | None = None) -> Scan:
    """``root/<class>/...``: every image below a class folder has that class's label.

    Files directly in ``root`` are not part of the layout (READMEs, manifests) and are ignored,
    as are hidden files and folders (names starting with ``.``: ``.DS_Store``, ``._x.png``,
    ``.ipynb_checkpoints``), which operating systems and tools create.
    """
    result = Scan(records=[])
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if class_dir.name.startswith("."):
            continue
        files = sorted(
            p
            for p in class_dir.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
        if not files:
            result.warnings.append(f"empty class folder ignored: {class_dir}")
            continue
        for file in files:
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                result.skipped.append(Skipped(str(file), f"not an image file ({file.suffix!r})"))
                continue
            key = key_prefix + file.relative_to(root).as_posix()
            result.records.append(ImageRecord(file, key, class_dir.name, split=split))
    return result


def scan_whoi(
    root: Path, train_years: list[str] | None = None, test_years: list[str] | None = None
) -> Scan:
    """``root/<year>/<class>/*.png`` (temporal split): ``train_years`` are split into train and
    val, ``test_years`` form the test set. Defaults: the last year is the test set and the others
    are training years; given only one of the lists, the other is every remaining year."""
    years = sorted(p.name for p in root.iterdir() if p.is_dir() and _YEAR.match(p.name))
    if not years:
        raise ValueError(f"{root}: no year folders (e.g. 2014/) found for the WHOI layout")
    train = None if train_years is None else [str(y) for y in train_years]
    test = None if test_years is None else [str(y) for y in test_years]
    if test is None:
        test = [y for y in years if y not in train] if train is not None else years[-1:]
    if train is None:
        train = [y for y in years if y not in test]
    if not train:
        raise ValueError(
            f"{root}: no training years (found {years}, test_years={test}); the WHOI layout "
            "needs at least one year for training: set train_years and test_years"
        )
    overlap = sorted(set(train) & set(test))
    if overlap:
        raise ValueError(f"years {overlap} are in both train_years and test_years")
    missing = sorted(set(train + test) - set(years))
    if missing:
        raise ValueError(f"{root}: no folder for years {missing}; found {years}")
    result = Scan(records=[])
    for year in years:
        if year not in train and year not in test:
            count = sum(1 for p in (root / year).rglob("*") if p.is_file())
            result.skipped.append(
                Skipped(
                    str(root / year), f"year in neither train_years nor test_years ({count} files)"
                )
            )
            continue
        part = scan_class_folders(root / year, f"{year}/", TRAINVAL if year in train else "test")
        result.records += part.records
        result.skipped += part.skipped
        result.warnings += part.warnings
    return result


def scan_table(table: Path, delimiter: str, path_column: str, label_column: str) -> Scan:
    """A CSV manifest or an EcoTaxa TSV; relative paths are relative to the table's folder."""
    result = Scan(records=[])
    with open(table, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        columns = reader.fieldnames or []
        absent = [c for c in (path_column, label_column) if c not in columns]
        if absent:
            raise ValueError(
                f"{table}: missing column(s) {absent}; found {columns}. A manifest needs "
                "'path,label' (optional 'split', 'domain'); an EcoTaxa export needs "
                "'img_file_name' and 'object_annotation_category'"
            )
        metadata_columns = [
            c for c in columns if c not in (path_column, label_column, "split", "domain")
        ]
        first_line: dict[Path, int] = {}
        for line, row in enumerate(reader, start=2):
            if _is_ecotaxa_type_row(row):
                continue
            raw_path = (row.get(path_column) or "").strip()
            label = (row.get(label_column) or "").strip()
            where = f"{table}:{line}"
            if not raw_path:
                result.skipped.append(Skipped(where, f"empty {path_column}"))
                continue
            file = Path(raw_path) if Path(raw_path).is_absolute() else table.parent / raw_path
            # The split hash reads the key: the same file must give the same key however it is
            # written (``./a.png``, ``a.png``) and wherever the dataset folder is moved.
            key = Path(os.path.normpath(raw_path)).as_posix()
            if Path(raw_path).is_absolute() and file.is_relative_to(table.parent):
                key = file.relative_to(table.parent).as_posix()
            if not label:
                result.skipped.append(Skipped(str(file), f"no label ({where})"))
                continue
            if not file.is_file():
                result.skipped.append(Skipped(str(file), f"file not found ({where})"))
                continue
            if file in first_line:
                result.skipped.append(
                    Skipped(str(file), f"listed again ({where}; first at line {first_line[file]})")
                )
                continue
            first_line[file] = line
            split = (row.get("split") or "").strip() or None
            result.records.append(
                ImageRecord(
                    path=file,
                    key=key,
                    label=label,
                    split=split,
                    domain=(row.get("domain") or "").strip() or None,
                    metadata={c: row.get(c) or "" for c in metadata_columns},
                )
            )
    if not result.records and not result.skipped:
        result.warnings.append(f"{table} has no rows")
    return result


def _is_ecotaxa_type_row(row: dict[str, str | None]) -> bool:
    """EcoTaxa exports may carry a second header row of column types: ``[t]`` and ``[f]``."""
    values = [v for v in row.values() if isinstance(v, str) and v]
    return bool(values) and all(v in ("[t]", "[f]") for v in values)
