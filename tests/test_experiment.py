import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from conftest import REPOSITORY, TINY_DIFFUSION

from cli import main
from lightning_modules.common.abundance import ESTIMATORS
from lightning_modules.common.preemption import PREEMPTED_STATUS
from workflows.experiment import ExperimentRunner
from workflows.experiment_config import (
    Experiment,
    ExperimentSettings,
    MethodSettings,
    read_settings,
    settings_with_absolute_paths,
)
from workflows.report_rows import table_rows

SMOKE = REPOSITORY / "configs" / "experiments" / "smoke.yaml"
EXPERIMENT_CONFIGS = sorted((REPOSITORY / "configs" / "experiments").glob("*.yaml"))
# The ResNet baselines of the tests: resnet10t keeps timm's ImageNet stem at 16 px, a small
# fraction of resnet18's compute with the small-input stem; what the tests check (stages, resume,
# ranks, records) does not depend on the backbone.
LIGHT_BACKBONE = {"model.init_args.backbone": "resnet10t"}
# L-BFGS probes choose their weight decay on validation among two decays, not the default five,
# with 10 iterations a round, not 50 (the probes' largest cost; test_probe.py checks the choice
# among the whole grid and the solution against scikit-learn's).
DECAY_GRID = {"model.init_args.weight_decay": [1e-3, 1e-1], "model.init_args.lbfgs_iterations": 10}


def _smoke_config(path):
    """``smoke.yaml`` with the light backbone for the supervised, SimCLR and DINO runs."""
    settings = settings_with_absolute_paths(SMOKE)
    for name in ("supervised", "simclr", "dino"):
        baseline = settings["baselines"][name]
        baseline["overrides"] = {**baseline.get("overrides", {}), **LIGHT_BACKBONE}
    for name in ("diffusion", "encoder", "pixels"):
        probe = settings["probes"][name]
        probe["overrides"] = {**probe.get("overrides", {}), **DECAY_GRID}
    for readout in settings["probes"]["readouts"].values():  # one decay for AdamW: its default
        if readout.get("overrides", {}).get("model.init_args.solver") == "adamw":
            readout["overrides"]["model.init_args.weight_decay"] = 1e-4
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def _wait_for(path, process, timeout=240):
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the experiment ended before {path} appeared: {process.stderr.read()}")
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_smoke_experiment_preempted_mid_stage_resumes_and_reports_every_method(tmp_path, capsys):
    out = tmp_path / "smoke"
    smoke = _smoke_config(tmp_path / "smoke.yaml")
    command = [sys.executable, "cli.py", "experiment", "--config", str(smoke), "--out", str(out)]
    process = subprocess.Popen(
        command, cwd=REPOSITORY, env=dict(os.environ), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # Preempt it (SIGTERM, as a scheduler does) inside the baselines stage, after the first
    # epoch of a supervised run: it saves the step it is at and says so in its exit status.
    interrupted = out / "runs" / "supervised_balanced"
    _wait_for(interrupted / "wall_time.json", process)
    _wait_for(interrupted / "checkpoints" / "last.ckpt", process)
    process.send_signal(signal.SIGTERM)
    assert process.wait() == PREEMPTED_STATUS, process.stderr.read()[-3000:]
    assert not (interrupted / "done.json").exists(), "the run finished before the kill"
    assert not (out / "baselines" / "done.json").exists()
    completed = [out / "data" / "done.json", out / "diffusion" / "done.json"]
    completed.append(out / "runs" / "diffusion" / "checkpoints" / "last.ckpt")
    before = {path: path.stat().st_mtime_ns for path in completed}
    interrupted_wall = json.loads((interrupted / "wall_time.json").read_text())["wall_s"]

    # A report of the unfinished run says what it lacks.
    assert main(["report", str(out)]) == 0
    partial = (out / "report.md").read_text()
    missing = "probe_diffusion_balanced, probe_diffusion_concat_t_balanced, probe_diffusion_pool"
    assert f"Not in the tables (not evaluated yet): {missing}" in partial

    capsys.readouterr()
    assert main(["experiment", "--config", str(smoke), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "[data] done earlier, skipped" in log and "[diffusion] done earlier, skipped" in log
    assert "supervised_balanced: resuming from" in log
    assert {path: path.stat().st_mtime_ns for path in completed} == before  # not redone
    compute = json.loads((interrupted / "compute.json").read_text())
    assert compute["resumed"] and compute["epochs"] == 4
    assert compute["wall_s"] > interrupted_wall > 0  # the interrupted attempt counts too

    rows = [row.label for row in table_rows(read_settings(out / "experiment.json")[0])]
    assert rows[2:] == [
        "diffusion timesteps concatenated (per layer)", "diffusion 2x2 pooling",
        "diffusion AdamW (same features)", "diffusion online probe's checkpoint",
        "diffusion attention-pooling head (non-linear)",
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
        for name, counted in result["abundance"].items():
            assert set(counted["error"]) == {"cc", "acc", "pacc", "emq"}
            assert sum(counted["true"]) == pytest.approx(1.0)
            # Shifted sets also at their class mix planted on the test images.
            planted = counted.get("planted_error")
            assert (planted is None) == (name == "test")
            expected = {*ESTIMATORS, "missing", "exact_rates"}
            assert planted is None or set(planted) == expected
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
    # The readouts on validation: the solvers and the checkpoints compared on the same features,
    # and the online probe's score after each diffusion epoch.
    assert "| AdamW (same features) | adamw, linear | `last.ckpt` |" in report
    assert "- Solvers on the same features: lbfgs (the grid)" in report
    assert "- Checkpoints, same probe: `best_probe.ckpt`" in report
    assert "| 1 | `" in report.split("The online probe during diffusion pretraining")[1]
    assert (out / "runs" / "diffusion" / "checkpoints" / "best_probe.ckpt").is_file()
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
        main(["experiment", "--config", str(smoke), "--out", str(out), "--force", "clustering"])
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
    only_mae = ExperimentSettings(baselines={"mae": MethodSettings()})
    assert [row.label for row in table_rows(only_mae)][2:] == ["MAE probe"]

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(subset.read_text().replace("  mae:", "  byol:"))
    assert main(["experiment", "--config", str(unknown)]) == 2
    assert "baselines ['byol'] are not registered; choose among" in capsys.readouterr().err

    misspelt = tmp_path / "misspelt.yaml"
    misspelt.write_text(subset.read_text().replace("pool_2x2:", "pool_2x2:\n      overides: {}"))
    assert main(["experiment", "--config", str(misspelt)]) == 2
    error = capsys.readouterr().err
    assert "probes.readouts.pool_2x2: unknown key 'overides'; did you mean 'overrides'?" in error

    best = tmp_path / "best.yaml"
    best_line = "pool_2x2:\n      checkpoint: best.ckpt"
    best.write_text(subset.read_text().replace("pool_2x2:", best_line))
    assert main(["experiment", "--config", str(best)]) == 2
    error = capsys.readouterr().err
    assert "probes.readouts.pool_2x2.checkpoint must be one of last.ckpt, best_probe.ckpt" in error
    # A readout of the online probe's checkpoint, in a run whose diffusion never wrote one.
    readout = replace(experiment.readouts["pool_2x2"], checkpoint="best_probe.ckpt")
    with pytest.raises(FileNotFoundError, match="add the online probe to diffusion.overrides"):
        runner.readout_checkpoint("pool_2x2", readout)


def test_one_budget_for_every_pretraining_run(tmp_path, capsys):
    import lightning as L
    from lightning.pytorch.callbacks import Timer

    from workflows.experiment_config import Budget

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


# A whole experiment at toy size: every stage, one baseline (or none), and a probe without
# pretraining (raw pixels), whose numbers must not depend on the number of processes. Its probes
# take one weight decay: the tests of it are about processes, not the choice of a decay.
TOY_EXPERIMENT = """
name: toy
data: {configs}/data/synthetic.yaml
data_overrides:
  synthetic: {{classes: 4, per_class: 24, imbalance: 4.0, size: 32,
              domains: [source, temporal], ood_fraction: 0.3, seed: 3}}
  image_size: 16
  batch_size: 8
  max_per_class: 10
  progress: false
regimes: [long_tailed]
trainer_overrides: {{{processes}precision: 32-true, enable_progress_bar: false,
                    enable_model_summary: false}}
{diffusion}
baselines: {baselines}
probes:
  diffusion:
    config: {configs}/probe_diffusion.yaml
    max_epochs: 2
    overrides:
      model.init_args.features.init_args.layers: ["mid.*"]
      model.init_args.features.init_args.timesteps: [1, 10]
      model.init_args.weight_decay: 0.001
  encoder: {{config: {configs}/probe_encoder.yaml, max_epochs: 2, overrides: {{{decay}}}}}
{pixels}samples: 4
"""
TWO_PROCESSES = "accelerator: cpu, devices: 2, strategy: ddp, "


def _toy_experiment(path, processes="", supervised=True, pixels=True):
    configs = REPOSITORY / "configs"
    backbone = ", ".join(f"{k}: {v}" for k, v in LIGHT_BACKBONE.items())
    baselines = (
        f"{{supervised: {{config: {configs}/supervised.yaml, max_epochs: 4, "
        f"overrides: {{{backbone}}}}}}}"
    )
    decay = "model.init_args.weight_decay: 0.001"  # one decay: no grid to choose from
    pixels_probe = f"  pixels: {{config: {configs}/probe_pixels.yaml, max_epochs: 2, "
    pixels_probe += f"overrides: {{{decay}}}}}\n"
    path.write_text(
        TOY_EXPERIMENT.format(
            configs=configs, processes=processes, baselines=baselines if supervised else "{}",
            diffusion=TINY_DIFFUSION.format(configs=configs),
            pixels=pixels_probe if pixels else "", decay=decay,
        )
    )  # fmt: skip
    return path


def _children(pid):
    """The processes ``pid`` started (Lightning's launcher starts ranks 1 to N - 1)."""
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _gone(pid, timeout=30):
    """Whether process ``pid`` ends (exits, or is a zombie its parent has not reaped yet)."""
    deadline = time.monotonic() + timeout
    while "zombie" not in _state(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _state(pid):
    """The process's state line in ``/proc``; an exited process reads as a zombie."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0]
    except (FileNotFoundError, IndexError):
        return "zombie"


def _records(out):
    return {
        (r["regime"], r["method"], r["eval_set"], r["metric"]): r["value"]
        for r in json.loads((out / "results.json").read_text())
    }


@pytest.mark.skipif(sys.platform != "linux", reason="reads the process tree from /proc")
def test_experiment_on_two_processes_resumes_after_a_rank_is_killed(tmp_path):
    config = _toy_experiment(tmp_path / "ddp.yaml", TWO_PROCESSES)
    out = tmp_path / "ddp"
    command = [sys.executable, "cli.py", "experiment", "--config", str(config), "--out", str(out)]

    def start():
        return subprocess.Popen(
            command, cwd=REPOSITORY, env=dict(os.environ), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    # Rank zero (the launching process) killed mid-baselines: rank 1 ends too.
    process = start()
    interrupted = out / "runs" / "supervised_long_tailed"
    _wait_for(interrupted / "checkpoints" / "last.ckpt", process)
    [rank_one] = _children(process.pid)
    process.kill()
    process.wait()
    assert _gone(rank_one), "rank 1 outlived the process that launched it"
    assert not (interrupted / "done.json").exists(), "the run finished before the kill"
    assert not (out / "baselines" / "done.json").exists()

    # Rank 1 killed in the probes stage: the launcher ends the job.
    process = start()
    _wait_for(out / "runs" / "probe_diffusion_long_tailed", process)
    [rank_one] = _children(process.pid)
    os.kill(rank_one, signal.SIGKILL)
    assert process.wait(timeout=60) != 0
    assert (out / "baselines" / "done.json").exists()
    assert not (out / "probes" / "done.json").exists()
    log = process.stdout.read()
    assert "supervised_long_tailed: resuming from" in log

    # The same command finishes the job; rank zero alone wrote the markers and the report.
    finished = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-3000:]
    log = finished.stdout
    assert "[baselines] done earlier, skipped" in log
    for stage in ("probes", "clustering", "report"):
        assert log.count(f"[{stage}] done in") == 1, log
    assert log.count("wrote ") == 1
    for marker in out.glob("*/done.json"):
        assert json.loads(marker.read_text())["processes"] == 2
    assert json.loads((interrupted / "compute.json").read_text())["devices"] == 2

    # The records of a one-process run; the numbers agree where no pretraining differs.
    alone = tmp_path / "alone"
    assert main(["experiment", "--config", str(_toy_experiment(tmp_path / "one.yaml")),
                 "--out", str(alone)]) == 0  # fmt: skip
    two, one = _records(out), _records(alone)
    assert set(two) == set(one)
    for key, value in two.items():
        # Raw pixels: the same data and the same full-batch L-BFGS, each image tested once.
        # The pretrained rows saw other batches (twice the global batch, another order).
        tolerance = 1e-6 if key[1].startswith("raw pixels") else 0.35
        assert value == pytest.approx(one[key], abs=tolerance), key


@pytest.mark.skipif(sys.platform != "linux", reason="simulates a two-task SLURM job")
@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_experiment_started_by_torchrun_or_slurm(launcher, tmp_path):
    # The stages of any experiment on two processes: one probe (of the diffusion model) is enough.
    config = _toy_experiment(tmp_path / "x.yaml", TWO_PROCESSES, supervised=False, pixels=False)
    out = tmp_path / "run"
    experiment = ["-m", "cli", "experiment", "--config", str(config), "--out", str(out)]
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    if launcher == "torchrun":
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--master-port", str(port)]  # fmt: skip
        processes = [subprocess.Popen([*torchrun, *experiment], cwd=REPOSITORY, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)]  # fmt: skip
    else:  # what srun --ntasks-per-node 2 sets for each task of a one-node job
        slurm = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1",
                 "SLURM_NODEID": "0", "SLURM_JOB_NAME": "plankton", "SLURM_JOB_ID": "4242",
                 "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": str(port)}  # fmt: skip
        processes = [
            subprocess.Popen(
                [sys.executable, *experiment], cwd=REPOSITORY, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env={**os.environ, **slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
            )
            for r in range(2)
        ]  # fmt: skip
    outputs = [process.communicate(timeout=600) for process in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    log = "".join(stdout for stdout, _ in outputs)
    assert "Starting with 2 processes" in "".join(err for _, err in outputs)
    assert log.count("[report] done in") == 1
    assert json.loads((out / "probes" / "done.json").read_text())["processes"] == 2
    assert (out / "report.md").is_file()


def test_processes_the_trainer_settings_cannot_run_are_refused(monkeypatch):
    from workflows.distributed import launch_processes

    assert launch_processes({"accelerator": "cpu", "devices": 1}).world_size == 1
    with pytest.raises(ValueError, match="strategy 'ddp_spawn': an experiment on several"):
        launch_processes({"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"})
    monkeypatch.setenv("WORLD_SIZE", "2")  # started by torchrun as one of two
    with pytest.raises(ValueError, match="one of 2 that were started together"):
        launch_processes({"accelerator": "cpu", "devices": 1, "strategy": "auto"})
