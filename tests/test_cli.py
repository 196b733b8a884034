import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPOSITORY

from cli import PlanktonCLI, datamodule_from_config, main
from datamodules.synthetic import SyntheticPlankton, class_frequencies

TINY_DATA = [
    "--data.synthetic.classes",
    "4",
    "--data.synthetic.per_class",
    "16",
    "--data.synthetic.size",
    "32",
    "--data.image_size",
    "16",
    "--data.batch_size",
    "8",
    "--data.progress",
    "false",
]
MODEL_CONFIGS = sorted((REPOSITORY / "configs").glob("*.yaml"))


def test_data_synth_writes_a_dataset(tmp_path, capsys):
    out = tmp_path / "synth"
    code = main(
        [
            "data",
            "synth",
            "--out",
            str(out),
            "--classes",
            "3",
            "--per-class",
            "5",
            "--size",
            "24",
            "--domains",
            "source,temporal",
            "--seed",
            "1",
        ]
    )
    assert code == 0
    lines = (out / "manifest.csv").read_text().splitlines()
    assert lines[0] == "path,label,split,domain"
    assert {line.rsplit(",", 1)[1] for line in lines[1:]} == {"source", "temporal"}
    assert len([p for p in out.iterdir() if p.is_dir()]) == 3
    assert main(["data", "synth", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_data_inspect_json_lists_counts_and_skipped(tmp_path, capsys):
    main(
        [
            "data",
            "synth",
            "--out",
            str(tmp_path / "d"),
            "--classes",
            "3",
            "--per-class",
            "10",
            "--size",
            "24",
            "--domains",
            "source",
        ]
    )
    broken = sorted(p for p in (tmp_path / "d").iterdir() if p.is_dir())[0]
    (broken / "corrupt.png").write_bytes(b"\x89PNG garbage")
    capsys.readouterr()
    assert main(["data", "inspect", "--root", str(tmp_path / "d"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["classes"]) == 3
    assert set(report["counts"]) == {"train", "val", "test"}
    total = sum(sum(split.values()) for split in report["counts"].values())
    assert total == sum(class_frequencies(3, 10, SyntheticPlankton().imbalance))
    assert [s["path"].rsplit("/", 1)[1] for s in report["skipped"]] == ["corrupt.png"]
    assert report["skipped"][0]["reason"]


def test_data_inspect_reads_model_and_data_configs(capsys):
    for config in ("configs/data/synthetic.yaml", "configs/supervised.yaml"):
        datamodule = datamodule_from_config(REPOSITORY / config)
        assert datamodule.source == "synthetic" and datamodule.image_size == 32
    assert main(["data", "inspect", "--root", "/nonexistent/plankton"]) == 2
    assert "/nonexistent/plankton" in capsys.readouterr().err


def test_data_inspect_prints_a_table(tmp_path, capsys):
    main(
        [
            "data",
            "synth",
            "--out",
            str(tmp_path / "d"),
            "--classes",
            "2",
            "--per-class",
            "6",
            "--size",
            "24",
        ]
    )
    capsys.readouterr()
    main(["data", "inspect", "--root", str(tmp_path / "d" / "manifest.csv")])
    out = capsys.readouterr().out
    assert "2 classes" in out and "temporal" in out and "skipped files: 0" in out


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=lambda p: p.name)
def test_every_model_config_parses_without_arguments(config):
    result = subprocess.run(
        [sys.executable, "cli.py", "fit", "--config", str(config), "--print_config"],
        cwd=REPOSITORY,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "class_path: lightning_modules." in result.stdout


def test_fit_test_predict_through_the_cli(tmp_path):
    root = tmp_path / "run"
    common = [
        "--config",
        str(REPOSITORY / "configs/supervised.yaml"),
        *TINY_DATA,
        "--trainer.default_root_dir",
        str(root),
    ]
    main(["fit", *common, "--trainer.max_epochs", "1", "--trainer.precision", "32-true"])
    checkpoint = root / "supervised" / "version_0" / "checkpoints" / "last.ckpt"
    assert checkpoint.exists()
    assert list((root / "supervised" / "version_0").glob("events.out.tfevents.*"))
    assert not (Path.cwd() / "lightning_logs").exists()
    state = torch.load(checkpoint, weights_only=False)
    assert state["hyper_parameters"]["num_classes"] == 4
    assert len(state["hyper_parameters"]["class_names"]) == 4
    tested = PlanktonCLI(["test", *common, "--ckpt_path", str(checkpoint)])
    metrics = tested.trainer.callback_metrics
    for eval_set in ("test", "temporal", "geographic"):
        assert 0 <= metrics[f"{eval_set}/acc"] <= 1 and 0 <= metrics[f"{eval_set}/macro_f1"] <= 1
    main(["predict", *common, "--ckpt_path", str(checkpoint)])
