"""Writing a classifier's predictions as an EcoTaxa import table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.sources import scan
from workflows.ecotaxa import check_ecotaxa_name, write_ecotaxa_predictions

CLASSES = ["copepod", "diatom", "Cnidaria<Hydrozoa", "detritus"]
FILES = ["a.png", "b.png", "deep/c.png"]
PROBABILITIES = np.array(
    [
        [0.7, 0.1, 0.15, 0.05],
        [0.2, 0.3, 0.123456789, 0.376543211],
        [0.25, 0.25, 0.25, 0.25],  # ties keep the class order
    ],
    dtype=np.float32,
)


@pytest.fixture
def sample(tmp_path) -> Path:
    """A sample folder with tiny real PNGs, one in a subfolder."""
    for i, name in enumerate(FILES):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 4), 40 * i, np.uint8)).save(tmp_path / name)
    return tmp_path


def rows(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text(encoding="utf-8").splitlines()]


def test_round_trip_through_the_suite_reader(sample):
    table = write_ecotaxa_predictions(
        sample / "ecotaxa_sample.tsv", FILES, CLASSES, torch.from_numpy(PROBABILITIES)
    )
    result = scan(table, format="ecotaxa")
    assert not result.skipped and not result.warnings
    assert {r.key: r.label for r in result.records} == {
        "a.png": "copepod",
        "b.png": "detritus",
        "deep/c.png": "copepod",
    }
    assert [r.path for r in result.records] == [sample / f for f in FILES]
    assert [r.metadata["object_id"] for r in result.records] == ["a", "b", "c"]


def test_header_type_row_scores_and_status(sample):
    table = write_ecotaxa_predictions(sample / "ecotaxa_sample.tsv", FILES, CLASSES, PROBABILITIES)
    assert table.read_bytes().isascii()  # no byte-order mark on an ASCII table
    header, types, *data = rows(table)
    assert header == [
        "img_file_name",
        "object_id",
        "object_annotation_category",
        "object_annotation_status",
        "object_pred_1_category",
        "object_pred_1_score",
        "object_pred_2_category",
        "object_pred_2_score",
        "object_pred_3_category",
        "object_pred_3_score",
    ]
    assert types == ["[t]"] * 5 + ["[f]", "[t]", "[f]", "[t]", "[f]"]
    assert [row[3] for row in data] == ["predicted"] * 3
    assert data[1][4:] == [
        "detritus",
        "0.37654322",
        "diatom",
        "0.3",
        "copepod",
        "0.2",
    ]
    assert data[2][4::2] == ["copepod", "diatom", "Cnidaria<Hydrozoa"]
    for row, probabilities in zip(data, PROBABILITIES, strict=True):
        scores = [float(s) for s in row[5::2]]
        assert scores == sorted(scores, reverse=True)
        # the written text reads back as the very float32 the classifier gave
        assert [np.float32(s) for s in row[5::2]] == sorted(probabilities, reverse=True)[:3]


def test_labels_object_ids_and_unicode(sample):
    classes = ["copepod", "diatom", "Cératium", "detritus"]
    table = write_ecotaxa_predictions(
        sample / "ecotaxa_sample.tsv",
        FILES,
        classes,
        PROBABILITIES,
        top_k=1,
        object_ids=["s1_a", "s1_b", "s1_c"],
        labels=["unknown", "Cératium", "copepod"],
    )
    # EcoTaxa reads a table without a UTF-8 byte-order mark as Latin-1
    assert table.read_bytes().startswith(b"\xef\xbb\xbf")
    _, _, *data = rows(table)
    assert [row[1:4] for row in data] == [
        ["s1_a", "unknown", "predicted"],
        ["s1_b", "Cératium", "predicted"],
        ["s1_c", "copepod", "predicted"],
    ]
    assert [r.label for r in scan(table).records] == ["unknown", "Cératium", "copepod"]


@pytest.mark.parametrize("name", ["predictions.tsv", "ecotaxa_x.csv", "Ecotaxa_x.tsv", "ecotaxa"])
def test_refuses_names_ecotaxa_does_not_import(sample, name):
    with pytest.raises(ValueError, match=r"ecotaxa_\*\.tsv"):
        write_ecotaxa_predictions(sample / name, FILES, CLASSES, PROBABILITIES)
    assert not (sample / name).exists()
    with pytest.raises(ValueError, match="ecotaxa_predictions.tsv"):
        check_ecotaxa_name(sample / "predictions.tsv")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"files": FILES[:2]}, r"shape \(3, 4\); expected \(2, 4\)"),
        ({"class_names": CLASSES[:3]}, r"expected \(3, 3\)"),
        ({"object_ids": ["a", "b"]}, "2 object_ids for 3 files"),
        ({"labels": ["copepod"]}, "1 labels for 3 files"),
        ({"labels": ["copepod", " ", "diatom"]}, r"labels\[1\] is empty"),
        ({"object_ids": ["x", "y", "x"]}, "object_id 'x' is given to several images"),
        ({"files": ["a.png", "b.png", "other/a.png"]}, "object_id 'a' is given to several"),
        ({"top_k": 5}, "top_k=5 must be between 1 and the number of classes \\(4\\)"),
        ({"top_k": 0}, "top_k=0"),
        ({"probabilities": PROBABILITIES * 10}, r"in \[0, 1\]: pass softmax outputs"),
        ({"files": ["a.png", "b.png", "gone.png"]}, "1 image\\(s\\) not found.*'gone.png'"),
    ],
)
def test_bad_input(sample, change, message):
    arguments = {
        "path": sample / "ecotaxa_sample.tsv",
        "files": FILES,
        "class_names": CLASSES,
        "probabilities": PROBABILITIES,
        **change,
    }
    with pytest.raises(ValueError, match=message):
        write_ecotaxa_predictions(**arguments)
    assert not (sample / "ecotaxa_sample.tsv").exists()


def test_process_columns_name_what_predicted_every_object(sample):
    process = {"process_model_sha256": "ab12", "process_suite_version": "0.1.0"}
    table = write_ecotaxa_predictions(
        sample / "ecotaxa_sample.tsv", FILES, CLASSES, PROBABILITIES, top_k=1, process=process
    )
    header, types, *data = rows(table)
    assert header[-2:] == ["process_model_sha256", "process_suite_version"]
    assert types[-2:] == ["[t]", "[t]"] and len(types) == len(header)
    assert {tuple(row[-2:]) for row in data} == {("ab12", "0.1.0")}
    assert not scan(table, format="ecotaxa").skipped
    for bad, message in (({"model": "x"}, "not a process column"),
                         ({"process_model": " "}, "process_model is empty")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            write_ecotaxa_predictions(sample / "ecotaxa_b.tsv", FILES, CLASSES, PROBABILITIES,
                                      process=bad)  # fmt: skip
