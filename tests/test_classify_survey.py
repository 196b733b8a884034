"""Classifying a survey of many samples in one run, and the provenance of every output set."""

import errno
import hashlib
import json
import os
import shutil
from datetime import datetime

import pytest
import test_classify
import torch

from cli import main
from workflows.classify import classify_folder
from workflows.classify_provenance import suite_version
from workflows.classify_survey import classify_samples

# test_classify's checkpoints and sample, built once per module.
data, sample = test_classify.data, test_classify.sample
supervised, strict = test_classify.supervised, test_classify.strict
DEVICE, _read = test_classify.DEVICE, test_classify._read
OPTIONS = {"top_k": 2, "abundance": "cc,pacc", "reject": True, "n_boot": 10, "device": DEVICE}


@pytest.fixture
def survey(sample, tmp_path):
    """Three samples: the test sample (with its corrupt file), one class folder of it, and a
    folder without images."""
    root = tmp_path / "cruise"
    shutil.copytree(sample, root / "station_a")
    first_class = sorted(p for p in sample.iterdir() if p.is_dir() and p.name != "night")[0]
    shutil.copytree(first_class, root / "station_b" / first_class.name)
    (root / "station_c").mkdir()
    (root / "station_c" / "log.txt").write_text("the pump failed")
    (root / ".hidden").mkdir()  # not a sample
    return root


def test_a_survey_gives_each_sample_what_classifying_its_folder_gives(strict, survey, tmp_path):
    checkpoint = strict[0]
    out = tmp_path / "results" / "survey.csv"
    result = classify_samples(checkpoint, survey, out, ecotaxa=True, **OPTIONS)
    assert [s.sample_id for s in result.samples] == ["station_a", "station_b", "station_c"]
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "survey.csv", "survey_provenance.json", "survey_samples_counts.csv",
        "survey_samples_counts_cc.csv", "survey_samples_counts_pacc.csv", "survey_skipped.csv",
    ]  # fmt: skip

    predictions, counts = _read(out), _read(out.with_name("survey_samples_counts.csv"))
    skipped = _read(out.with_name("survey_skipped.csv"))
    assert list(counts[0]) == ["sample_id", "class", "estimator", "count", "fraction", "low",
                               "high"]  # fmt: skip
    for sample_id in ("station_a", "station_b"):
        single = tmp_path / "single" / f"{sample_id}.csv"
        classify_folder(checkpoint, survey / sample_id, single, **OPTIONS)
        rows = [{k: v for k, v in r.items() if k != "sample_id"} for r in predictions
                if r["sample_id"] == sample_id]  # fmt: skip
        assert rows == _read(single) and rows
        by_class = {c["class"]: c for c in _read(single.with_name(f"{sample_id}_counts.csv"))}
        mine = [c for c in counts if c["sample_id"] == sample_id]
        assert len(mine) == 2 * len(by_class)
        for c in mine:
            expected = by_class[c["class"]]
            assert [c[k] for k in ("count", "fraction", "low", "high")] == [
                expected[f"{c['estimator']}_{k}"] for k in ("count", "fraction", "low", "high")
            ]
        reasons = _read(single.with_name(f"{sample_id}_skipped.csv"))
        assert [{"sample_id": sample_id, **r} for r in reasons] == [
            s for s in skipped if s["sample_id"] == sample_id
        ]
    assert [s["path"] for s in skipped] == ["night/broken/corrupt.png", ""]
    assert skipped[1]["sample_id"] == "station_c" and "no image files" in skipped[1]["reason"]
    empty = [c for c in counts if c["sample_id"] == "station_c"]
    assert {c["count"] for c in empty} == {"0"} and len(empty) == 2 * 5  # 4 classes + unknown

    # The wide matrices are the long table pivoted.
    for name in ("cc", "pacc"):
        wide = _read(out.with_name(f"survey_samples_counts_{name}.csv"))
        assert [w["sample_id"] for w in wide] == ["station_a", "station_b", "station_c"]
        pivoted = {(c["sample_id"], c["class"]): c["count"] for c in counts
                   if c["estimator"] == name}  # fmt: skip
        assert {(w["sample_id"], k): v for w in wide for k, v in w.items()
                if k != "sample_id"} == pivoted  # fmt: skip

    # One EcoTaxa table per sample with images, ids unique across samples, provenance columns.
    sha256 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    table = _read(survey / "station_a" / "ecotaxa_survey.tsv", delimiter="\t")
    assert {row["process_model_sha256"] for row in table[1:]} == {sha256}
    assert all(row["object_id"].startswith("station_a_") for row in table[1:])
    assert not (survey / "station_c" / "ecotaxa_survey.tsv").exists()


def test_every_output_set_records_its_provenance(strict, supervised, survey, tmp_path):
    checkpoint, threshold = strict
    classify_samples(checkpoint, survey, tmp_path / "out", **OPTIONS)  # a folder
    provenance = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert (tmp_path / "out" / "samples_counts_pacc.csv").is_file()
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert provenance["checkpoint"] == str(checkpoint.resolve())
    assert provenance["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert provenance["method"] == "supervised"
    assert provenance["classes"] == supervised[0].class_names
    assert provenance["temperature"] == saved["calibration"]["classify"]["temperature"]
    assert provenance["rejection_threshold"] == pytest.approx(threshold)
    assert provenance["suite_version"] == suite_version() and suite_version()
    assert provenance["settings"] == {
        "samples": str(survey), "top_k": 2, "batch_size": 64, "abundance": ["cc", "pacc"],
        "reject": True, "n_boot": 10,
    }  # fmt: skip
    assert datetime.fromisoformat(provenance["time"]).utcoffset().total_seconds() == 0

    # The single folder gets its sidecar beside the outputs it had.
    classify_folder(supervised[1], survey / "station_b", tmp_path / "p.csv", device=DEVICE)
    single = json.loads((tmp_path / "p_provenance.json").read_text())
    assert single["checkpoint_sha256"] == hashlib.sha256(supervised[1].read_bytes()).hexdigest()
    assert single["settings"]["images"] == str(survey / "station_b")


def test_a_manifest_names_the_samples(supervised, survey, tmp_path):
    manifest = survey / "manifest.csv"
    absolute = survey / "station_a"
    manifest.write_text(f"sample_id,path\nb,station_b\na,{absolute}\n")
    classify_samples(supervised[1], manifest, tmp_path / "m.csv", device=DEVICE)
    classify_samples(supervised[1], survey, tmp_path / "f.csv", device=DEVICE)
    named = {"station_a": "a", "station_b": "b"}
    by_folder = [{**r, "sample_id": named[r["sample_id"]]} for r in _read(tmp_path / "f.csv")
                 if r["sample_id"] in named]  # fmt: skip
    assert sorted(_read(tmp_path / "m.csv"), key=lambda r: (r["sample_id"], r["path"])) == sorted(
        by_folder, key=lambda r: (r["sample_id"], r["path"])
    )
    assert [r["sample_id"] for r in _read(tmp_path / "m_samples_counts_cc.csv")] == ["b", "a"]


def test_refusals_come_before_any_image_is_read(supervised, survey, tmp_path, monkeypatch, capsys):
    def unread(*args):
        raise AssertionError("an image was read before the refusal")

    monkeypatch.setattr("workflows.classify_sample.load_preprocessed", unread)
    checkpoint = str(supervised[1])
    (tmp_path / "s_samples_counts.csv").write_text("earlier results")
    command = ["classify", "--checkpoint", checkpoint, "--samples", str(survey)]
    assert main([*command, "--out", str(tmp_path / "s.csv")]) == 2
    error = capsys.readouterr().err.strip()
    assert "s_samples_counts.csv exists" in error and "\n" not in error

    manifest = tmp_path / "manifest.csv"
    manifest.write_text("sample_id,path\nx,station_x\n")
    assert main([*command[:-1], str(manifest), "--out", str(tmp_path / "n.csv")]) == 2
    error = capsys.readouterr().err.strip()
    assert "station_x" in error and "'x'" in error and "\n" not in error
    assert (tmp_path / "s_samples_counts.csv").read_text() == "earlier results"
    assert not (tmp_path / "n.csv").exists()

    with pytest.raises(SystemExit):  # --images and --samples exclude each other
        main([*command, "--images", str(survey / "station_a")])
    assert "not allowed with" in capsys.readouterr().err


def test_a_failed_survey_leaves_no_output(supervised, survey, tmp_path, monkeypatch):
    (survey / "station_d").mkdir()
    (survey / "station_d" / "zero.png").write_bytes(b"")  # no readable image: counted zero
    out = tmp_path / "out" / "s.csv"

    def full(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out.parent))

    with monkeypatch.context() as patch:
        patch.setattr("workflows.classify_survey._write_counts", full)
        with pytest.raises(OSError, match="No space left"):
            classify_samples(supervised[1], survey, out, device=DEVICE, ecotaxa=True)
    assert not list(out.parent.iterdir()) and not (survey / "station_a" / "ecotaxa_s.tsv").exists()
    result = classify_samples(supervised[1], survey, out, device=DEVICE)  # not refused
    assert [(s.sample_id, s.images, s.skipped) for s in result.samples][2:] == [
        ("station_c", 0, 0), ("station_d", 0, 1)
    ]  # fmt: skip
    assert {row["count"] for row in _read(out.with_name("s_samples_counts.csv"))
            if row["sample_id"] == "station_d"} == {"0"}  # fmt: skip
