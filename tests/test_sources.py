"""Scanning class folders, WHOI year folders, CSV manifests and EcoTaxa exports."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.sources import TRAINVAL, detect_format, scan


def image(path: Path, level: int = 0) -> Path:
    """A real 4x4 greyscale image (the format follows the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), level, np.uint8)).save(path)
    return path


def by_key(records) -> dict:
    return {record.key: record for record in records}


# -- class folders -------------------------------------------------------------------------


@pytest.fixture
def class_root(tmp_path) -> Path:
    root = tmp_path / "dataset"
    image(root / "copepod" / "a.png")
    image(root / "copepod" / "b.jpg")
    image(root / "copepod" / "deep" / "nested" / "c.tif")
    (root / "copepod" / "notes.txt").write_text("sampled at station 4")
    image(root / "diatom" / "x.PNG")
    (root / "empty_class").mkdir()
    image(root / ".hidden" / "h.png")
    image(root / "copepod" / "._a.png")  # macOS resource fork
    (root / "copepod" / ".DS_Store").write_bytes(b"\0\0")
    image(root / "copepod" / ".ipynb_checkpoints" / "a-checkpoint.png")
    image(root / "stray.png")  # at the root: not part of the layout
    (root / "README.md").write_text("# dataset")
    return root


def test_class_folders_records(class_root):
    result = scan(class_root)
    records = by_key(result.records)
    assert set(records) == {
        "copepod/a.png",
        "copepod/b.jpg",
        "copepod/deep/nested/c.tif",
        "diatom/x.PNG",
    }
    for key, record in records.items():
        assert record.label == key.split("/")[0]
        assert record.path == class_root / key
        assert record.path.is_file()
        assert record.split is None
        assert record.domain is None
        assert record.metadata == {}
    assert {r.label for r in result.records} == {"copepod", "diatom"}


def test_class_folders_keys_are_relative_and_posix(class_root):
    for record in scan(class_root).records:
        assert not Path(record.key).is_absolute()
        assert "\\" not in record.key
        assert str(class_root) not in record.key


def test_class_folders_skip_non_images_with_a_reason(class_root):
    result = scan(class_root)
    skipped = {Path(s.path).name: s.reason for s in result.skipped}
    assert set(skipped) == {"notes.txt"}
    assert "not an image" in skipped["notes.txt"]
    assert ".txt" in skipped["notes.txt"]
    assert result.skipped[0].as_dict() == {
        "path": str(class_root / "copepod" / "notes.txt"),
        "reason": skipped["notes.txt"],
    }


def test_class_folders_ignore_root_files_and_hidden_folders(class_root):
    result = scan(class_root)
    names = {r.path.name for r in result.records} | {Path(s.path).name for s in result.skipped}
    assert "stray.png" not in names
    assert "README.md" not in names
    assert "h.png" not in names
    assert not {"._a.png", ".DS_Store", "a-checkpoint.png"} & names
    assert ".hidden" not in {r.label for r in result.records}


def test_class_folders_warn_about_empty_class(class_root):
    result = scan(class_root)
    assert "empty_class" not in {r.label for r in result.records}
    assert len(result.warnings) == 1
    assert "empty_class" in result.warnings[0]
    assert "empty" in result.warnings[0]


def test_class_folders_scan_is_stable(class_root):
    first = [(r.key, r.label) for r in scan(class_root).records]
    second = [(r.key, r.label) for r in scan(class_root).records]
    assert first == second
    assert first == sorted(first)


def test_keys_do_not_depend_on_where_the_dataset_lives(tmp_path):
    for place in ("disk_a", "disk_b/mirror"):
        image(tmp_path / place / "ciliate" / "one.png")
    a = scan(tmp_path / "disk_a").records
    b = scan(tmp_path / "disk_b" / "mirror").records
    assert [r.key for r in a] == [r.key for r in b] == ["ciliate/one.png"]


def test_scan_accepts_a_string_path(class_root):
    assert by_key(scan(str(class_root)).records).keys() == by_key(scan(class_root).records).keys()


# -- detect_format -------------------------------------------------------------------------


def test_detect_format_files(tmp_path):
    for name, expected in [
        ("manifest.csv", "manifest"),
        ("MANIFEST.CSV", "manifest"),
        ("export.tsv", "ecotaxa"),
    ]:
        path = tmp_path / name
        path.write_text("x\n")
        assert detect_format(path) == expected, name


def test_detect_format_whoi_year_folders(tmp_path):
    image(tmp_path / "2013" / "copepod" / "a.png")
    image(tmp_path / "2014" / "copepod" / "b.png")
    (tmp_path / ".git").mkdir()  # hidden folders do not count
    (tmp_path / "README.md").write_text("WHOI")
    assert detect_format(tmp_path) == "whoi"


def test_detect_format_class_folders(tmp_path):
    image(tmp_path / "copepod" / "a.png")
    image(tmp_path / "2014" / "b.png")  # one year-like class among others: still class folders
    assert detect_format(tmp_path) == "folder"


@pytest.mark.parametrize("name", ["labels.json", "images.zip", "photo.png", "notes.txt"])
def test_detect_format_rejects_other_files(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"{}")
    with pytest.raises(ValueError, match=r"\.csv"):
        detect_format(path)
    with pytest.raises(ValueError):
        scan(path)


def test_scan_rejects_unknown_format(class_root):
    with pytest.raises(ValueError, match="unknown format"):
        scan(class_root, format="parquet")


def test_scan_missing_path(tmp_path):
    missing = tmp_path / "nowhere" / "data"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        scan(missing)


# -- WHOI -----------------------------------------------------------------------------------


@pytest.fixture
def whoi_root(tmp_path) -> Path:
    root = tmp_path / "whoi"
    image(root / "2013" / "copepod" / "a.png")
    image(root / "2013" / "diatom" / "b.png")
    (root / "2013" / "diatom" / "log.txt").write_text("x")
    image(root / "2014" / "copepod" / "c.png")
    (root / "2014" / "mix").mkdir(parents=True)
    image(root / "2015" / "copepod" / "d.png")
    image(root / "2015" / "diatom" / "e.png")
    return root


def test_whoi_default_tests_on_the_last_year(whoi_root):
    result = scan(whoi_root)
    records = by_key(result.records)
    assert set(records) == {
        "2013/copepod/a.png",
        "2013/diatom/b.png",
        "2014/copepod/c.png",
        "2015/copepod/d.png",
        "2015/diatom/e.png",
    }
    for key, record in records.items():
        year, label, _ = key.split("/")
        assert record.label == label  # the class, not the year
        assert record.path == whoi_root / key
        assert record.split == ("test" if year == "2015" else TRAINVAL)
    assert TRAINVAL == "trainval"


def test_whoi_passes_on_skipped_files_and_warnings(whoi_root):
    result = scan(whoi_root)
    assert [Path(s.path).name for s in result.skipped] == ["log.txt"]
    assert len(result.warnings) == 1
    assert "mix" in result.warnings[0]


def test_whoi_explicit_years(whoi_root):
    result = scan(whoi_root, train_years=["2015"], test_years=["2013"])
    splits = {r.key: r.split for r in result.records}
    assert splits == {
        "2013/copepod/a.png": "test",
        "2013/diatom/b.png": "test",
        "2015/copepod/d.png": TRAINVAL,
        "2015/diatom/e.png": TRAINVAL,
    }
    year_skips = [s for s in result.skipped if Path(s.path).name == "2014"]
    assert len(year_skips) == 1
    assert year_skips[0].path == str(whoi_root / "2014")
    assert "neither" in year_skips[0].reason
    assert "(1 files)" in year_skips[0].reason


def test_whoi_skipped_year_counts_its_files(whoi_root):
    result = scan(whoi_root, train_years=["2014"], test_years=["2015"])
    (skip,) = [s for s in result.skipped if Path(s.path).name == "2013"]
    assert "3 files" in skip.reason  # two images and the log
    assert not any(r.key.startswith("2013/") for r in result.records)


def test_whoi_years_may_be_integers(whoi_root):
    as_int = scan(whoi_root, train_years=[2013, 2014], test_years=[2015])
    as_str = scan(whoi_root, train_years=["2013", "2014"], test_years=["2015"])
    assert [(r.key, r.split) for r in as_int.records] == [(r.key, r.split) for r in as_str.records]


def test_whoi_test_years_only_trains_on_the_rest(whoi_root):
    result = scan(whoi_root, test_years=["2014"])
    splits = {r.key.split("/")[0]: r.split for r in result.records}
    assert splits == {"2013": TRAINVAL, "2014": "test", "2015": TRAINVAL}


def test_whoi_train_years_only_tests_on_the_rest(whoi_root):
    result = scan(whoi_root, train_years=["2013", "2014"])
    splits = {r.key.split("/")[0]: r.split for r in result.records}
    assert splits == {"2013": TRAINVAL, "2014": TRAINVAL, "2015": "test"}


def test_whoi_needs_a_training_year(tmp_path):
    image(tmp_path / "2014" / "copepod" / "a.png")
    with pytest.raises(ValueError, match="no training years"):
        scan(tmp_path)


def test_whoi_overlapping_years(whoi_root):
    with pytest.raises(ValueError, match="2014"):
        scan(whoi_root, train_years=["2013", "2014"], test_years=["2014"])


@pytest.mark.parametrize(("train", "test"), [(["2013", "2099"], ["2015"]), (["2013"], ["1999"])])
def test_whoi_unknown_year(whoi_root, train, test):
    unknown = "2099" if "2099" in train else "1999"
    with pytest.raises(ValueError, match=unknown):
        scan(whoi_root, train_years=train, test_years=test)


def test_whoi_forced_on_a_folder_without_years(class_root):
    with pytest.raises(ValueError, match="year"):
        scan(class_root, format="whoi")


# -- CSV manifest ---------------------------------------------------------------------------


def write_table(path: Path, rows: list[list[str]], delimiter: str = ",", **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(delimiter.join(row) + "\n" for row in rows), **kwargs)
    return path


@pytest.fixture
def manifest(tmp_path, monkeypatch) -> Path:
    data = tmp_path / "data"
    image(data / "imgs" / "a.png")
    image(data / "imgs" / "b.png")
    image(data / "imgs" / "unlabelled.png")
    outside = image(tmp_path / "elsewhere" / "c.png")
    # Run from another folder: relative paths must not depend on the working directory.
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return write_table(
        data / "manifest.csv",
        [
            ["path", "label", "split", "domain", "depth_m", "station"],  # line 1
            ["imgs/a.png", "copepod", "train", "lab", "10", "S1"],  # line 2
            ["imgs/b.png", "diatom", "test", "", "20", "S2"],  # line 3
            [str(outside), "copepod", "", "insitu", "", "S3"],  # line 4
            ["imgs/missing.png", "copepod", "train", "", "5", "S4"],  # line 5
            ["imgs/unlabelled.png", "", "train", "", "5", "S5"],  # line 6
            ["", "diatom", "", "", "", ""],  # line 7
        ],
    )


def test_manifest_records(manifest, tmp_path):
    result = scan(manifest)
    records = by_key(result.records)
    assert list(records) == ["imgs/a.png", "imgs/b.png", str(tmp_path / "elsewhere" / "c.png")]
    a, b, c = records.values()
    assert a.path == manifest.parent / "imgs" / "a.png"
    assert (a.label, a.split, a.domain) == ("copepod", "train", "lab")
    assert (b.label, b.split, b.domain) == ("diatom", "test", None)
    assert c.path == tmp_path / "elsewhere" / "c.png"
    assert (c.split, c.domain) == (None, "insitu")
    assert a.metadata == {"depth_m": "10", "station": "S1"}
    assert c.metadata == {"depth_m": "", "station": "S3"}


def test_manifest_keys_ignore_how_a_path_is_written(tmp_path):
    image(tmp_path / "data" / "imgs" / "a.png")
    image(tmp_path / "data" / "imgs" / "b.png")
    image(tmp_path / "data" / "imgs" / "c.png")
    absolute = tmp_path / "data" / "imgs" / "c.png"
    manifest = tmp_path / "data" / "manifest.csv"
    manifest.write_text(f"path,label\n./imgs/a.png,x\nimgs//b.png,x\n{absolute},x\n")
    assert [r.key for r in scan(manifest).records] == ["imgs/a.png", "imgs/b.png", "imgs/c.png"]


def test_manifest_skipped_rows_name_the_line(manifest):
    result = scan(manifest)
    assert len(result.skipped) == 3
    missing, unlabelled, no_path = result.skipped
    assert missing.path == str(manifest.parent / "imgs" / "missing.png")
    assert "not found" in missing.reason
    assert f"{manifest}:5" in missing.reason
    assert unlabelled.path == str(manifest.parent / "imgs" / "unlabelled.png")
    assert "label" in unlabelled.reason
    assert f"{manifest}:6" in unlabelled.reason
    assert no_path.path == f"{manifest}:7"
    assert "path" in no_path.reason
    assert result.warnings == []


def test_manifest_strips_whitespace_and_reads_a_bom(tmp_path):
    image(tmp_path / "a.png")
    manifest = write_table(
        tmp_path / "excel.csv",
        [["path", "label"], [" a.png ", " copepod "]],
        encoding="utf-8-sig",
    )
    (record,) = scan(manifest).records
    assert record.key == "a.png"
    assert record.label == "copepod"
    assert record.path == tmp_path / "a.png"


def test_manifest_quoted_fields(tmp_path):
    image(tmp_path / "with, comma.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text('path,label,note\n"with, comma.png",copepod,"a, b"\n')
    (record,) = scan(manifest).records
    assert record.path == tmp_path / "with, comma.png"
    assert record.metadata == {"note": "a, b"}


@pytest.mark.parametrize(
    ("header", "absent"), [(["file", "label"], "path"), (["path", "class"], "label")]
)
def test_manifest_missing_column(tmp_path, header, absent):
    manifest = write_table(tmp_path / "m.csv", [header, ["a.png", "copepod"]])
    with pytest.raises(ValueError, match=re.escape(f"missing column(s) ['{absent}']")):
        scan(manifest)


def test_manifest_without_rows_warns(tmp_path):
    manifest = write_table(tmp_path / "m.csv", [["path", "label"]])
    result = scan(manifest)
    assert result.records == [] and result.skipped == []
    assert len(result.warnings) == 1
    assert "no rows" in result.warnings[0]


def test_manifest_forced_format_on_other_suffix(tmp_path):
    image(tmp_path / "a.png")
    table = write_table(tmp_path / "list.dat", [["path", "label"], ["a.png", "rotifer"]])
    (record,) = scan(table, format="manifest").records
    assert record.label == "rotifer"


# -- EcoTaxa ---------------------------------------------------------------------------------


def ecotaxa_rows(with_types: bool) -> list[list[str]]:
    header = ["img_file_name", "object_id", "object_annotation_category", "object_depth_min"]
    types = ["[t]", "[t]", "[t]", "[f]"]
    rows = [
        ["img/1.jpg", "obj_1", "Copepoda<Maxillopoda", "12.5"],
        ["img/2.jpg", "obj_2", "detritus", "30"],
        ["img/3.jpg", "obj_3", "detritus", "31"],  # file not written
    ]
    return [header] + ([types] if with_types else []) + rows


@pytest.mark.parametrize("with_types", [True, False])
def test_ecotaxa_export(tmp_path, with_types):
    export = tmp_path / "export"
    image(export / "img" / "1.jpg")
    image(export / "img" / "2.jpg")
    tsv = write_table(export / "ecotaxa_export.tsv", ecotaxa_rows(with_types), delimiter="\t")
    result = scan(tsv)
    records = by_key(result.records)
    assert list(records) == ["img/1.jpg", "img/2.jpg"]
    first = records["img/1.jpg"]
    assert first.path == export / "img" / "1.jpg"
    assert first.label == "Copepoda<Maxillopoda"
    assert first.metadata == {"object_id": "obj_1", "object_depth_min": "12.5"}
    assert records["img/2.jpg"].label == "detritus"
    # The type row is neither a record nor a skipped file; line numbers stay physical.
    (skip,) = result.skipped
    assert skip.path == str(export / "img" / "3.jpg")
    line = 5 if with_types else 4
    assert f"{tsv}:{line}" in skip.reason


def test_ecotaxa_missing_column(tmp_path):
    tsv = write_table(
        tmp_path / "export.tsv",
        [["img_file_name", "object_id"], ["1.jpg", "obj_1"]],
        delimiter="\t",
    )
    with pytest.raises(ValueError, match="object_annotation_category"):
        scan(tsv)


def test_ecotaxa_is_not_read_as_a_csv(tmp_path):
    # A comma inside a TSV field is data, not a separator.
    image(tmp_path / "1.jpg")
    tsv = write_table(
        tmp_path / "export.tsv",
        [
            ["img_file_name", "object_annotation_category", "sample_comment"],
            ["1.jpg", "Acantharea", "net, 200 um"],
        ],
        delimiter="\t",
    )
    (record,) = scan(tsv).records
    assert record.metadata == {"sample_comment": "net, 200 um"}


def test_manifest_lists_a_file_only_once(tmp_path):
    image(tmp_path / "imgs" / "a.png")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\nimgs/a.png,copepod\nimgs/a.png,diatom\n")
    result = scan(manifest)
    assert [(r.key, r.label) for r in result.records] == [("imgs/a.png", "copepod")]
    assert "listed again" in result.skipped[0].reason and "line 2" in result.skipped[0].reason
