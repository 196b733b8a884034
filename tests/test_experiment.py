import itertools
import json
import os
import subprocess
import sys
import time

import pytest
from conftest import REPOSITORY

from cli import main
from workflows.experiment import Experiment, ExperimentRunner
from workflows.report import table_rows

SMOKE = REPOSITORY / "configs" / "experiments" / "smoke.yaml"
EXPERIMENT_CONFIGS = sorted((REPOSITORY / "configs" / "experiments").glob("*.yaml"))


def _wait_for(path, process, timeout=240):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the experiment ended before {path} appeared: {process.stderr.read()}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_smoke_experiment_killed_mid_stage_resumes_and_reports_every_method(tmp_path, capsys):
    out = tmp_path / "smoke"
    command = [sys.executable, "cli.py", "experiment", "--config", str(SMOKE), "--out", str(out)]
    process = subprocess.Popen(
        command, cwd=REPOSITORY, env=dict(os.environ), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # Kill it inside the baselines stage, after the first epoch of a supervised run.
    interrupted = out / "runs" / "supervised_balanced"
    _wait_for(interrupted / "wall_time.json", process)
    _wait_for(interrupted / "checkpoints" / "last.ckpt", process)
    process.kill()
    process.wait()
    assert not (interrupted / "done.json").exists(), "the run finished before the kill"
    assert not (out / "baselines" / "done.json").exists()
    completed = [out / "data" / "done.json", out / "diffusion" / "done.json"]
    completed.append(out / "runs" / "diffusion" / "checkpoints" / "last.ckpt")
    before = {path: path.stat().st_mtime_ns for path in completed}
    interrupted_wall = json.loads((interrupted / "wall_time.json").read_text())["wall_s"]

    # A report of the unfinished run says what it lacks.
    assert main(["report", str(out)]) == 0
    partial = (out / "report.md").read_text()
    assert "Not in the tables (not evaluated yet): probe_diffusion_balanced, supervised_" in partial

    capsys.readouterr()
    assert main(["experiment", "--config", str(SMOKE), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "[data] done earlier, skipped" in log and "[diffusion] done earlier, skipped" in log
    assert "supervised_balanced: resuming from" in log
    assert {path: path.stat().st_mtime_ns for path in completed} == before  # not redone
    compute = json.loads((interrupted / "compute.json").read_text())
    assert compute["resumed"] and compute["epochs"] == 4
    assert compute["wall_s"] > interrupted_wall > 0  # the interrupted attempt counts too

    rows = [row.label for row in table_rows(json.loads((out / "experiment.json").read_text()))]
    assert rows[2:] == [
        "supervised end to end", "supervised probe", "SimCLR probe", "DINO probe", "MAE probe",
        "raw pixels (logistic regression)",
    ]  # fmt: skip
    records = json.loads((out / "results.json").read_text())
    found = {(r["regime"], r["method"], r["eval_set"], r["metric"]) for r in records}
    expected = itertools.product(
        ["balanced", "long_tailed"], rows, ["test", "geographic", "temporal"],
        ["acc", "macro_f1"],
    )  # fmt: skip
    assert found == set(expected)
    # Every classifier calibrated on validation, and counted on every labelled set.
    for run, heads in (("supervised_long_tailed", {"classify"}),
                       ("probe_diffusion_long_tailed", {"classify", "fusion"})):  # fmt: skip
        result = json.loads((out / "runs" / run / "results.json").read_text())
        assert set(result["calibration"]) == heads
        assert all(c["temperature"] > 0 for c in result["calibration"].values())
        assert set(result["abundance"]) == {"test", "geographic", "temporal"}
        for counted in result["abundance"].values():
            assert set(counted["error"]) == {"cc", "acc", "pacc", "emq"}
            assert sum(counted["true"]) == pytest.approx(1.0)
    report = (out / "report.md").read_text()
    assert "Not in the tables" not in report
    main_tables = report.split("## Main results")[1].split("\n## ")[0]
    for row in rows:
        assert main_tables.count(f"| {row}") == 2  # one row in each regime's table
    assert "## Calibration, unknowns and counts" in report
    for figure in ("diffusion_samples.png", "real_images.png", "confusion_best.png",
                   "heatmap_long_tailed_macro_f1.png"):  # fmt: skip
        assert (out / "figures" / figure).stat().st_size > 0
    for source in ("diffusion", "DINO", "MAE", "raw pixels"):  # clustering
        assert f"| {source} | " in report
    assert "| dino | " in report  # compute
    assert list((out / "runs" / "simclr").glob("events.out.tfevents.*"))
    for compute in (out / "runs").glob("*/compute.json"):  # every run's training FLOPs
        assert json.loads(compute.read_text())["train_flops_per_image"] > 0, compute
    assert "training GFLOP per image" in report
    collapse = json.loads((out / "runs" / "dino" / "compute.json").read_text())["collapse"]
    assert set(collapse["signals"]) == {"embedding_std_ratio", "teacher_entropy_ratio"}

    # New images classified with the best diffusion probe and with the supervised model.
    sample = tmp_path / "sample"
    main(["data", "synth", "--out", str(sample), "--classes", "2", "--per-class", "3",
          "--size", "32", "--domains", "source"])  # fmt: skip
    readable = len(list(sample.rglob("*.png")))
    (sample / "corrupt.png").write_bytes(b"\x89PNG broken")
    for run in ("probe_diffusion_long_tailed", "supervised_long_tailed"):
        predictions = tmp_path / f"{run}.csv"
        checkpoint = out / "runs" / run / "checkpoints" / "last.ckpt"
        assert main(["classify", "--checkpoint", str(checkpoint), "--images", str(sample),
                     "--out", str(predictions)]) == 0  # fmt: skip
        assert len(predictions.read_text().splitlines()) == 1 + readable
        assert "corrupt.png" in (tmp_path / f"{run}_skipped.csv").read_text()
        counts = (tmp_path / f"{run}_counts.csv").read_text().splitlines()[1:]
        assert sum(int(line.split(",")[1]) for line in counts) == readable

    # The report is rebuilt from the folder alone, and --force redoes a stage and the later ones.
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    rebuilt = (out / "report.md").read_text()
    assert rebuilt.split("## Settings")[0] == report.split("## Settings")[0]
    clustering = (out / "clustering" / "done.json").stat().st_mtime_ns
    assert (
        main(["experiment", "--config", str(SMOKE), "--out", str(out), "--force", "clustering"])
        == 0
    )
    assert (out / "clustering" / "done.json").stat().st_mtime_ns != clustering
    assert (out / "probes" / "done.json").stat().st_mtime_ns  # kept


@pytest.mark.parametrize("config", EXPERIMENT_CONFIGS, ids=lambda p: p.name)
def test_every_experiment_config_loads(config):
    experiment = Experiment.from_file(config)
    assert set(experiment.regimes) <= {"balanced", "long_tailed"}
    for run in [experiment.diffusion, *experiment.baselines.values()]:
        assert run.config.is_file() and run.max_epochs > 0


def test_a_bad_experiment_config_names_the_problem(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("data: ../data/synthetic.yaml\ndiffusion: {config: nowhere.yaml}\n")
    assert main(["experiment", "--config", str(config)]) == 2
    assert "missing sections ['probes']" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "not an experiment run folder" in capsys.readouterr().err


def test_an_experiment_runs_any_subset_of_the_registered_baselines(tmp_path, capsys):
    text = SMOKE.read_text()
    subset = tmp_path / "subset.yaml"
    baselines = text[text.index("baselines:") : text.index("probes:")]
    subset.write_text(
        text.replace(
            baselines, "baselines:\n  mae: {config: ../mae.yaml, max_epochs: 1}\n"
        ).replace("../", f"{SMOKE.parent.parent}/")
    )
    experiment = Experiment.from_file(subset)
    assert list(experiment.baselines) == ["mae"]
    runner = ExperimentRunner(experiment, tmp_path / "run")
    assert list(runner.feature_sources("balanced")) == ["diffusion", "mae", "pixels"]
    assert [row.label for row in table_rows({"baselines": {"mae": {}}})][2:] == ["MAE probe"]

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(subset.read_text().replace("  mae:", "  byol:"))
    assert main(["experiment", "--config", str(unknown)]) == 2
    assert "baselines ['byol'] are not registered; choose among" in capsys.readouterr().err


def test_one_budget_for_every_pretraining_run(tmp_path, capsys):
    import lightning as L
    from lightning.pytorch.callbacks import Timer

    from workflows.experiment import Budget

    for setting, check in [
        ({"epochs": 3}, lambda t: t.max_epochs == 3),
        ({"images": 100}, lambda t: t.max_epochs == -1 and t.max_steps == 7),  # batch 16
        ({"minutes": 2}, lambda t: any(isinstance(c, Timer) for c in t.callbacks)),
    ]:
        trainer = L.Trainer(max_epochs=9, logger=False, enable_checkpointing=False)
        Budget.from_setting(setting, "budget").apply(trainer, global_batch=16)
        assert check(trainer), setting
    for bad, message in [
        ({"epoch": 3}, "did you mean 'epochs'"),
        ({"epochs": 3, "images": 9}, "exactly one of epochs, images, minutes"),
        ({"images": -1}, "budget.images must be a positive number"),
    ]:
        with pytest.raises(ValueError, match=message):
            Budget.from_setting(bad, "budget")
