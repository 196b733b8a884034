"""Fault injection on what users give the suite: oversized images, misspelt experiment keys,
outputs that must not be overwritten, and a cache built under a running fit."""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPOSITORY
from PIL import Image

from cli import main

SMOKE = REPOSITORY / "configs" / "experiments" / "smoke.yaml"


def _synth(out, classes=3, per_class=8, size=32):
    assert main(["data", "synth", "--out", str(out), "--classes", str(classes), "--per-class",
                 str(per_class), "--size", str(size), "--domains", "source"]) == 0  # fmt: skip
    return out


def test_a_decompression_bomb_is_skipped_and_listed_not_fatal(tmp_path, capsys):
    data = _synth(tmp_path / "d")
    (data / "manifest.csv").unlink()  # a plain tree of class folders
    folder = next(p for p in sorted(data.iterdir()) if p.is_dir())
    Image.new("L", (20000, 10000)).save(folder / "bomb.png")  # 200 MP, about 200 KB on disk
    capsys.readouterr()
    assert main(["data", "inspect", "--root", str(data), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    reasons = {item["path"].rsplit("/", 1)[-1]: item["reason"] for item in summary["skipped"]}
    assert "too large to decode: 20000x10000" in reasons["bomb.png"]
    assert "max_image_pixels" in reasons["bomb.png"]


@pytest.mark.parametrize(
    ("written", "misspelt", "suggested"),
    [
        ("trainer_overrides:", "trainer_overides:", "trainer_overrides"),
        ("  precision: 32-true", "  precison: 32-true", "precision"),
        ("  image_size: 16", "  imagesize: 16", "image_size"),
        ("clustering: {split: test}", "clustering: {splt: test}", "split"),
    ],
)
def test_a_misspelt_experiment_key_is_an_error_naming_the_closest(
    written, misspelt, suggested, tmp_path, capsys
):
    config = tmp_path / "misspelt.yaml"
    text = SMOKE.read_text().replace("../", f"{SMOKE.parent.parent}/")
    assert written in text
    config.write_text(text.replace(written, misspelt, 1))
    assert main(["experiment", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and f"did you mean '{suggested}'" in error
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_classify_refuses_to_overwrite_and_to_write_a_folder_or_a_non_csv(tmp_path, capsys):
    precious = tmp_path / "survey.png"
    precious.write_bytes(b"irreplaceable")
    folder = tmp_path / "out.csv"
    folder.mkdir()
    existing = tmp_path / "predictions.csv"
    existing.write_text("earlier results")
    for out, expected in [
        (precious, "must name a .csv file"),
        (folder, "is a folder"),
        (existing, "exists; choose another --out or pass --overwrite"),
    ]:
        code = main(["classify", "--checkpoint", str(tmp_path / "any.ckpt"), "--images",
                     str(tmp_path), "--out", str(out)])  # fmt: skip
        assert code == 2 and expected in capsys.readouterr().err
    assert precious.read_bytes() == b"irreplaceable"
    assert existing.read_text() == "earlier results"


def test_a_cache_built_during_a_fit_does_not_stop_it(tmp_path, capsys):
    """`data inspect` (here, in the test's process) at another image size builds a second cache
    of the source the fit (another process) reads; the fit must finish."""
    data = _synth(tmp_path / "d", classes=3, per_class=12)
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    fit = subprocess.Popen(
        [sys.executable, "cli.py", "fit", "--config", "configs/supervised.yaml",
         "--data.source", str(data), "--data.image_size", "16",
         "--model.init_args.backbone", "resnet10t", "--trainer.max_epochs", "3",
         "--trainer.precision", "32-true", "--trainer.enable_progress_bar", "false",
         "--trainer.default_root_dir", str(tmp_path / "runs")],
        cwd=REPOSITORY, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    deadline = tmp_path / "runs" / "supervised"
    start = time.monotonic()
    while not list(deadline.glob("version_*/checkpoints/*.ckpt")):  # the first epoch is done
        assert fit.poll() is None, fit.stderr.read()[-2000:]
        assert time.monotonic() - start < 240
        time.sleep(0.1)
    capsys.readouterr()
    assert main(["data", "inspect", "--root", str(data), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["skipped"] == []
    assert fit.wait(timeout=300) == 0, fit.stderr.read()[-2000:]
