"""Runs that fail loudly and lose nothing: a diverged fit, a preempted fit, a full disk, two
processes on one run folder."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPOSITORY

from cli import main, user_error
from datamodules.store import write_text_atomic
from lightning_modules.common import checkpoint_io
from lightning_modules.common.module import load_checkpoint
from lightning_modules.common.preemption import PREEMPTED_STATUS
from lightning_modules.common.run_lock import LOCK_NAME, FolderInUse, FolderLock
from workflows.lightning_cli import PlanktonCLI

TINY_FIT = [
    "--config", str(REPOSITORY / "configs/supervised.yaml"),
    "--model.init_args.backbone", "resnet10t",
    "--data.image_size", "16", "--data.batch_size", "8", "--data.progress", "false",
    "--trainer.precision", "32-true", "--trainer.max_epochs", "1",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]  # fmt: skip


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> list[str]:
    """Two classes of twelve images: a few steps an epoch."""
    data = tmp_path_factory.mktemp("runs") / "data"
    assert main(["data", "synth", "--out", str(data), "--classes", "2", "--per-class", "12",
                 "--size", "32", "--domains", "source"]) == 0  # fmt: skip
    return ["--data.source", str(data / "manifest.csv")]


@pytest.fixture(scope="module")
def trained(source, tmp_path_factory) -> Path:
    """``last.ckpt`` of one healthy epoch."""
    root = tmp_path_factory.mktemp("trained")
    assert main(["fit", *TINY_FIT, *source, "--trainer.default_root_dir", str(root)]) == 0
    [checkpoint] = root.glob("**/checkpoints/last.ckpt")
    return checkpoint


def test_a_diverged_fit_stops_in_one_line_and_keeps_no_checkpoint(source, tmp_path, capsys):
    root = tmp_path / "runs"
    args = [*TINY_FIT, *source, "--trainer.default_root_dir", str(root)]
    assert main(["fit", *args, "--model.init_args.lr", "1e12", "--trainer.max_epochs", "3"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "became NaN or infinite at step" in line and "--model.init_args.lr" in line
    assert "--trainer.precision" not in line  # it trains in 32-true already
    assert str(root) in line
    for checkpoint in root.glob("**/*.ckpt"):  # the epochs before it, finite
        load_checkpoint(checkpoint)


def test_a_resume_to_fewer_epochs_is_one_line(source, trained, tmp_path, capsys):
    root = tmp_path / "runs"
    args = [*TINY_FIT, *source, "--trainer.default_root_dir", str(root)]
    assert main(["fit", *args, "--trainer.max_epochs", "0", "--ckpt_path", str(trained)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: ") and "max_epochs" in line


def test_a_checkpoint_with_non_finite_weights_is_refused(source, trained, tmp_path, capsys):
    poisoned = tmp_path / "poisoned.ckpt"
    checkpoint = torch.load(trained, weights_only=True)
    name = next(k for k, v in checkpoint["state_dict"].items() if v.is_floating_point())
    checkpoint["state_dict"][name][...] = float("nan")
    torch.save(checkpoint, poisoned)
    with pytest.raises(ValueError, match=f"{poisoned} holds non-finite weights"):
        load_checkpoint(poisoned)
    images = tmp_path / "images"
    (images / "x").mkdir(parents=True)
    (images / "x" / "a.png").write_bytes(next(Path(source[1]).parent.rglob("*.png")).read_bytes())
    for command in (["test", *TINY_FIT, *source, "--ckpt_path", str(poisoned)],
                    ["classify", "--checkpoint", str(poisoned), "--images", str(images),
                     "--out", str(tmp_path / "out.csv")]):  # fmt: skip
        capsys.readouterr()
        assert main(command) == 2, command[0]
        assert "holds non-finite weights" in capsys.readouterr().err, command[0]


class SignalAtStep(L.Callback):
    """Sends this process ``signum`` once training reaches ``step``, as a scheduler would."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum, self.step = signum, step

    def on_train_batch_end(self, trainer, *_: object) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_preempted_fit_saves_its_step_exits_143_and_resumes_there(signum, source, tmp_path):
    root = tmp_path / "runs"
    args = [*TINY_FIT, *source, "--trainer.default_root_dir", str(root)]
    cli = PlanktonCLI([*args, "--trainer.max_epochs", "2"], run=False)
    cli.trainer.callbacks.append(SignalAtStep(signum, 2))
    with pytest.raises(SystemExit) as stopped:
        cli.trainer.fit(cli.model, cli.datamodule)
    assert stopped.value.code == PREEMPTED_STATUS
    [last] = root.glob("**/checkpoints/last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the handler does not outlive it

    resumed = PlanktonCLI([*args, "--trainer.max_epochs", "2"], run=False)
    resumed.trainer.fit(resumed.model, resumed.datamodule, ckpt_path=str(last))
    elsewhere = ["--trainer.default_root_dir", str(tmp_path / "alone")]
    alone = PlanktonCLI([*args, "--trainer.max_epochs", "2", *elsewhere], run=False)
    alone.trainer.fit(alone.model, alone.datamodule)
    assert resumed.trainer.global_step == alone.trainer.global_step  # not the epoch again


def test_a_full_disk_keeps_the_last_checkpoint_and_names_the_folder(
    source, tmp_path, capsys, monkeypatch
):
    root = tmp_path / "runs"
    save = checkpoint_io._save_synced

    def full_after_the_first_epoch(checkpoint: dict, staging: Path) -> None:
        if not (staging.parent / "last.ckpt").exists():
            return save(checkpoint, staging)
        staging.write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_io, "_save_synced", full_after_the_first_epoch)
    args = [*TINY_FIT, *source, "--trainer.default_root_dir", str(root)]
    assert main(["fit", *args, "--trainer.max_epochs", "2"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    [last] = root.glob("**/checkpoints/last.ckpt")
    assert line.startswith(f"error: {last.parent}: No space left on device writing the checkpoint")
    assert "the previous one is kept" in line and "--trainer.default_root_dir" in line
    assert load_checkpoint(last)["epoch"] == 0  # the first epoch's, whole
    assert all(p.suffix == ".ckpt" for p in last.parent.iterdir())  # no temporary left


@pytest.fixture
def live_holder():
    """``pid@host`` of a process that runs for the length of the test."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield f"{process.pid}@{socket.gethostname()}"
    process.kill()
    process.wait()


def test_a_folder_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, live_holder):
    lock = FolderLock(tmp_path, "plankton fit")
    lock.path.write_text(live_holder)
    with pytest.raises(FolderInUse, match=f"in use by process {live_holder} \\(plankton fit\\)"):
        lock.acquire()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    lock.path.write_text(f"{ended.stdout.strip()}@{socket.gethostname()}")
    with pytest.warns(UserWarning, match="taking over the lock of process"):
        lock.acquire()
    lock.acquire()  # held by this process already
    assert lock.path.read_text() == f"{os.getpid()}@{socket.gethostname()}"
    lock.release()
    assert not lock.path.exists()


def test_a_second_process_on_one_run_folder_is_refused(source, tmp_path, live_holder, capsys):
    out = tmp_path / "experiment"
    out.mkdir()
    (out / LOCK_NAME).write_text(live_holder)
    config = str(REPOSITORY / "configs/experiments/smoke.yaml")
    assert main(["experiment", "--config", config, "--out", str(out)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"{out}: in use by process {live_holder} (plankton experiment)" in line
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing started

    run = tmp_path / "runs" / "supervised" / "version_0"
    run.mkdir(parents=True)
    (run / LOCK_NAME).write_text(live_holder)
    logger = ["--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
              "--trainer.logger.save_dir", str(tmp_path / "runs"),
              "--trainer.logger.name", "supervised", "--trainer.logger.version", "0"]  # fmt: skip
    assert main(["fit", *TINY_FIT, *source, *logger]) == 2
    assert f"{run}: in use by process {live_holder} (plankton fit)" in capsys.readouterr().err
    assert not list(run.glob("**/*.ckpt"))


def test_a_full_disk_names_the_folder_of_any_atomic_write(tmp_path, monkeypatch):
    def full(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")  # as write() raises it: no name

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as failed:
        write_text_atomic(tmp_path / "results.json", "{}")
    assert failed.value.filename == str(tmp_path)
    message = user_error(failed.value)
    assert message.startswith(f"{tmp_path}: No space left on device: free space there")
    assert "PLANKTON_CACHE" in message and "--out" in message
    assert not list(tmp_path.iterdir())  # no temporary left
