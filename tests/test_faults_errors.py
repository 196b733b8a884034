"""A user's mistake ends with one line naming the option or file, exit status 2 and no empty run
folder; a probe's ``last.ckpt`` holds its fusion head; a checkpoint of other classes is refused
or flagged; empty evaluation sets are left out."""

import csv
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPOSITORY

import datamodules.datamodule as datamodule_module
from cli import main
from datamodules import PlanktonDataModule
from workflows.lightning_cli import (
    FEATURE_CHECKPOINT,
    PlanktonCLI,
    _remove_empty_run,
    resolve_feature_checkpoint,
)

COMMON = [
    "--data.image_size", "16", "--data.batch_size", "16", "--data.progress", "false",
    "--trainer.precision", "32-true", "--trainer.max_epochs", "1",
    "--trainer.enable_progress_bar", "false",
]  # fmt: skip
SUPERVISED = [
    "--config", str(REPOSITORY / "configs/supervised.yaml"), *COMMON,
    "--model.init_args.backbone", "resnet10t",
]  # fmt: skip
DIFFUSION = [
    "--config", str(REPOSITORY / "configs/diffusion.yaml"), *COMMON,
    "--model.init_args.base_channels", "8", "--model.init_args.channel_mult", "[1, 2]",
    "--model.init_args.attention_resolutions", "[8]", "--model.init_args.num_heads", "2",
]  # fmt: skip
# The probe config's default checkpoint glob, found under --trainer.default_root_dir.
PROBE = [
    "--config", str(REPOSITORY / "configs/probe_diffusion.yaml"), *COMMON,
    "--model.init_args.features.init_args.timesteps", "[1, 10]",
    "--model.init_args.fusion_top_k", "2",
]  # fmt: skip


class Unsafe:
    """An object ``torch.load(weights_only=True)`` refuses to build."""


@pytest.fixture(autouse=True)
def empty_working_folder(tmp_path, monkeypatch):
    """Every test runs from an empty folder: the probe config's relative checkpoint glob then
    finds only what is under ``--trainer.default_root_dir``, never a run of the user's."""
    monkeypatch.chdir(tmp_path)


def _write_manifest(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A 4-class synthetic dataset, variants of its manifest, and files that are no
    checkpoint."""
    folder = tmp_path_factory.mktemp("faults")
    data = folder / "data"
    assert main(["data", "synth", "--out", str(data), "--classes", "4", "--per-class", "20",
                 "--size", "32"]) == 0  # fmt: skip
    with open(data / "manifest.csv", newline="") as handle:
        header, *rows = list(csv.reader(handle))
    labels = sorted({row[1] for row in rows})
    one_class = folder / "one_class" / labels[0]
    one_class.mkdir(parents=True)
    for row in rows[:3]:
        (one_class / Path(row[0]).name).write_bytes((data / row[0]).read_bytes())
    (folder / "empty").mkdir()
    random_bytes = folder / "random.ckpt"
    noise = torch.randint(0, 256, (4000,), dtype=torch.uint8, generator=torch.Generator())
    random_bytes.write_bytes(noise.numpy().tobytes())
    (folder / "batch.yaml").write_text(f"source: {data / 'manifest.csv'}\nbatch_size: -1\n")
    unsafe = folder / "unsafe.ckpt"
    torch.save({"state_dict": {}, "note": Unsafe()}, unsafe)
    source_rows = [r for r in rows if not r[2]]
    return {
        "folder": folder,
        "manifest": data / "manifest.csv",
        "three_classes": _write_manifest(
            data / "three.csv", [header, *(r for r in rows if r[1] != labels[-1])]
        ),
        "renamed": _write_manifest(
            data / "renamed.csv",
            [header, *([r[0], f"taxon_{labels.index(r[1])}", *r[2:]] for r in rows)],
        ),
        # Train, val and the OOD sets fixed by the manifest: no row is left for test.
        "no_test": _write_manifest(
            data / "no_test.csv",
            [
                header,
                *(
                    [r[0], r[1], "val" if i % 5 == 0 else "train", r[3]]
                    for i, r in enumerate(source_rows)
                ),
                *(r for r in rows if r[2]),
            ],
        ),
        "no_label": _write_manifest(
            data / "no_label.csv", [["path", "split"], *([r[0], r[2]] for r in rows)]
        ),
        "one_class": one_class.parent,
        "empty": folder / "empty",
        "random_bytes": random_bytes,
        "unsafe": unsafe,
    }


@pytest.fixture(scope="module")
def probe_run(files, session_cache, tmp_path_factory) -> dict:
    """A tiny diffusion run, then a probe of it fitted and tested in one process as the
    experiment does; from a folder without ``runs/``, so that the probe config's default glob
    has to be found under ``--trainer.default_root_dir``."""
    root = files["folder"] / "runs"
    source = ["--data.source", str(files["manifest"]), "--trainer.default_root_dir", str(root)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PLANKTON_CACHE", str(session_cache))
        patch.chdir(tmp_path_factory.mktemp("elsewhere"))
        assert main(["fit", *DIFFUSION, *source]) == 0
        cli = PlanktonCLI([*PROBE, *source, "--trainer.max_epochs", "2"], run=False)
        cli.trainer.fit(cli.model, cli.datamodule)
        cli.trainer.test(cli.model, cli.datamodule, verbose=False)
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if "fusion" in k}
    return {
        "root": root,
        "source": source,
        "features": cli.model.features.init_args["checkpoint"],
        "folder": Path(cli.trainer.log_dir),
        "checkpoint": Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt",
        "metrics": metrics,
    }


def run_folders(root: Path) -> set[Path]:
    return set(root.rglob("version_*"))


def one_error_line(stderr: str, *names: object) -> str:
    """The only ``error:`` line of ``stderr``, after checking it names every one of ``names``
    and that no traceback was printed."""
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


def run_cli(*args: object, **env: str) -> subprocess.CompletedProcess:
    """``plankton *args`` in a new process."""
    return subprocess.run(
        [sys.executable, str(REPOSITORY / "cli.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )


# (command line, what its error line names); {name} stands for files[name], {root} for a run root.
USER_ERRORS = {
    "missing source": (["fit", *SUPERVISED, "--data.source", "{folder}/nowhere"],
                       ["{folder}/nowhere", "does not exist"]),
    "empty folder": (["fit", *SUPERVISED, "--data.source", "{empty}"], ["{empty}", "no images"]),
    "one class": (["fit", *SUPERVISED, "--data.source", "{one_class}"],
                  ["only one class", "data.source"]),
    "manifest without label": (["fit", *SUPERVISED, "--data.source", "{no_label}"],
                               ["{no_label}", "label"]),
    "image size 0": (["fit", *SUPERVISED, "--data.source", "{manifest}", "--data.image_size", "0"],
                     ["image_size"]),
    "batch size -1": (["fit", *SUPERVISED, "--data.source", "{manifest}",
                       "--data.batch_size", "-1"], ["batch_size", "-1"]),
    "batch size 0": (["fit", *SUPERVISED, "--data.source", "{manifest}",
                      "--data.batch_size", "0"], ["batch_size", "0"]),
    "inspect batch size -1": (["data", "inspect", "--config", "{folder}/batch.yaml"],
                              ["batch_size"]),
    "random bytes as checkpoint": (["test", *SUPERVISED, "--data.source", "{manifest}",
                                    "--ckpt_path", "{random_bytes}"],
                                   ["{random_bytes} is not a checkpoint"]),
    "unsafe pickle as checkpoint": (["test", *SUPERVISED, "--data.source", "{manifest}",
                                     "--ckpt_path", "{unsafe}"],
                                    ["{unsafe} is not a checkpoint", "Unsafe"]),
    "probe glob matches nothing": (["fit", *PROBE, "--data.source", "{manifest}"],
                                   [FEATURE_CHECKPOINT, "{root}"]),
}  # fmt: skip


@pytest.mark.parametrize("case", USER_ERRORS)
def test_a_user_error_is_one_line_and_leaves_no_run_folder(case, files, tmp_path, capsys):
    command, names = USER_ERRORS[case]
    root = tmp_path / "runs"
    values = {**files, "root": root}
    argv = [arg.format(**values) for arg in command]
    code = main([*argv, "--trainer.default_root_dir", str(root)] if argv[0] != "data" else argv)
    assert code == 2
    one_error_line(capsys.readouterr().err, *(name.format(**values) for name in names))
    assert not run_folders(tmp_path)


def test_a_read_only_output_folder_is_one_line(files, tmp_path, capsys, monkeypatch):
    # Root ignores file permissions: the refusal is simulated where folders are made.
    read_only = tmp_path / "read_only"
    make = os.makedirs

    def refuse(name: object, *args: object, **kwargs: object) -> None:
        if str(name).startswith(str(read_only)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(name))
        make(name, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", refuse)
    code = main(["fit", *SUPERVISED, "--data.source", str(files["manifest"]),
                 "--trainer.default_root_dir", str(read_only)])  # fmt: skip
    assert code == 2
    one_error_line(capsys.readouterr().err, read_only, "--trainer.default_root_dir")


def test_an_unknown_split_names_the_valid_ones(probe_run, tmp_path, capsys):
    code = main(["features", "cluster", *PROBE, *probe_run["source"],
                 "--split", "nosuchsplit", "--out", str(tmp_path)])  # fmt: skip
    assert code == 2
    one_error_line(capsys.readouterr().err, "nosuchsplit", "train, val, test")


def test_the_real_exit_status_and_the_traceback_on_demand(files, tmp_path, monkeypatch):
    command = ["fit", *SUPERVISED, "--data.source", files["empty"],
               "--trainer.default_root_dir", tmp_path]  # fmt: skip
    # A real process: `plankton` exits with main's status 2 and prints one line.
    plain = run_cli(*command)
    assert plain.returncode == 2
    one_error_line(plain.stderr, files["empty"])
    assert not run_folders(tmp_path)
    # On demand main raises instead, so the interpreter prints the traceback and exits with 1.
    argv = [str(arg) for arg in command]
    with pytest.raises(ValueError, match=f"no images found in {files['empty']}"):
        main([*argv, "--print_traceback"])
    monkeypatch.setenv("PLANKTON_TRACEBACK", "1")
    with pytest.raises(ValueError, match=f"no images found in {files['empty']}"):
        main(argv)
    assert not run_folders(tmp_path)


def test_parse_errors_keep_their_usage_message(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["fit", *SUPERVISED, "--data.batch_size", "many"])
    assert exit.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_a_bare_plankton_lists_every_command(capsys):
    assert main([]) == 2
    listing = capsys.readouterr().err
    for command in ("fit", "validate", "test", "predict", "data", "features", "classify"):
        assert f"\n  {command} " in listing


def test_last_ckpt_holds_the_fusion_of_the_in_process_test(probe_run):
    """The experiment tests the probe in the process that fitted it; ``plankton test`` in a new
    process, from ``last.ckpt``, must report the same fusion head."""
    assert probe_run["metrics"] and Path(probe_run["features"]).is_relative_to(probe_run["root"])
    saved = torch.load(probe_run["checkpoint"], weights_only=True)["state_dict"]
    assert saved["fusion_weight"].abs().sum() > 0 and len(set(saved["fusion_keys"].tolist())) == 2
    before = run_folders(probe_run["root"])
    tested = run_cli("test", *PROBE, *probe_run["source"], "--ckpt_path", probe_run["checkpoint"])
    assert tested.returncode == 0, tested.stderr[-3000:]
    (folder,) = run_folders(probe_run["root"]) - before

    def fusion_rows(run: Path) -> list[dict]:
        with open(run / "probe_results.csv", newline="") as handle:
            return [row for row in csv.DictReader(handle) if row["layer"].startswith("fusion(")]

    assert fusion_rows(folder) == fusion_rows(probe_run["folder"])
    for row in fusion_rows(folder):
        expected = probe_run["metrics"][f"{row['split']}/fusion_acc"]
        assert float(row["accuracy"]) == pytest.approx(expected, abs=1e-6)


def test_a_checkpoint_of_another_class_count_is_refused(files, probe_run, capsys):
    before = run_folders(probe_run["root"])
    code = main(["test", *PROBE, "--data.source", str(files["three_classes"]),
                 "--trainer.default_root_dir", str(probe_run["root"]),
                 "--ckpt_path", str(probe_run["checkpoint"])])  # fmt: skip
    assert code == 2
    line = one_error_line(capsys.readouterr().err, probe_run["checkpoint"], "4 classes", "has 3")
    assert "classes the checkpoint was trained on" in line
    # The run folder the failed test created held only its config: it is gone.
    assert run_folders(probe_run["root"]) == before


def test_a_checkpoint_of_other_class_names_is_flagged(files, probe_run):
    with pytest.warns(UserWarning, match=r"class names .* differ .*only in the data \[taxon_0"):
        code = main(["test", *PROBE, "--data.source", str(files["renamed"]),
                     "--trainer.default_root_dir", str(probe_run["root"]),
                     "--ckpt_path", str(probe_run["checkpoint"])])  # fmt: skip
    assert code == 0


def test_an_empty_test_set_is_left_out(files, monkeypatch):
    said = []
    monkeypatch.setattr(datamodule_module, "rank_zero_info", said.append)
    data = PlanktonDataModule(source=str(files["no_test"]), image_size=16, progress=False)
    assert data.eval_set_names == ["geographic", "temporal"]
    assert len(data.test_dataloader()) == 2
    assert [line for line in said if "left out of testing" in line and ": test (" in line]


def test_the_feature_checkpoint_is_found_under_the_run_root(tmp_path):
    pattern = "runs/diffusion/version_*/checkpoints/last.ckpt"
    found = tmp_path / "elsewhere" / "diffusion" / "version_3" / "checkpoints" / "last.ckpt"
    found.parent.mkdir(parents=True)
    found.touch()
    root = str(tmp_path / "elsewhere")
    assert (
        resolve_feature_checkpoint(pattern, root)
        == f"{root}/diffusion/version_*/checkpoints/last.ckpt"
    )
    assert resolve_feature_checkpoint("diffusion/version_3/checkpoints/last.ckpt", root) == str(
        found
    )
    (tmp_path / "runs" / "diffusion" / "version_0" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "diffusion" / "version_0" / "checkpoints" / "last.ckpt").touch()
    assert resolve_feature_checkpoint(pattern, root) == pattern  # the current folder comes first
    with pytest.raises(FileNotFoundError, match=f"{FEATURE_CHECKPOINT}: no checkpoint matches"):
        resolve_feature_checkpoint("nowhere/*.ckpt", root)


def test_only_a_new_run_folder_without_results_is_removed(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    def run(name: str, scalar: bool = False, checkpoint: bool = False) -> Path:
        folder = tmp_path / "model" / name
        folder.mkdir(parents=True)
        (folder / "config.yaml").write_text("model: {}\n")
        with SummaryWriter(folder) as writer:
            if scalar:
                writer.add_scalar("val/loss", 1.0, 0)
        if checkpoint:
            (folder / "checkpoints").mkdir()
            (folder / "checkpoints" / "last.ckpt").touch()
        return folder

    old = run("version_0")
    existing = {tmp_path / "model", old}
    for folder in (old, run("version_1", scalar=True), run("version_2", checkpoint=True)):
        _remove_empty_run(folder, existing)
        assert folder.exists()
    empty = run("version_3")
    _remove_empty_run(empty, existing)
    assert not empty.exists() and (tmp_path / "model").exists()
