import json
from pathlib import Path

import pytest
import torch
from conftest import REPOSITORY

from cli import main
from datamodules.synthetic import SyntheticPlankton, class_frequencies
from lightning_modules import load_diffusion
from workflows.lightning_cli import PlanktonCLI, datamodule_from_config

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


def synth(out, options=""):
    return main(["data", "synth", "--out", str(out), *options.split()])


def test_data_synth_writes_a_dataset(tmp_path, capsys):
    out = tmp_path / "synth"
    code = synth(out, "--classes 3 --per-class 5 --size 24 --domains source,temporal --seed 1")
    assert code == 0
    lines = (out / "manifest.csv").read_text().splitlines()
    assert lines[0] == "path,label,split,domain"
    assert {line.rsplit(",", 1)[1] for line in lines[1:]} == {"source", "temporal"}
    assert len([p for p in out.iterdir() if p.is_dir()]) == 3
    assert synth(out) == 2
    assert "not empty" in capsys.readouterr().err


def test_data_inspect_json_lists_counts_and_skipped(tmp_path, capsys):
    synth(tmp_path / "d", "--classes 3 --per-class 10 --size 24 --domains source")
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
    synth(tmp_path / "d", "--classes 2 --per-class 6 --size 24")
    capsys.readouterr()
    main(["data", "inspect", "--root", str(tmp_path / "d" / "manifest.csv")])
    out = capsys.readouterr().out
    assert "2 classes" in out and "temporal" in out and "skipped files: 0" in out


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=lambda p: p.name)
def test_every_model_config_parses_without_arguments(config, capsys, monkeypatch):
    monkeypatch.chdir(REPOSITORY)  # configs name the shared ones by paths relative to themselves
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: lightning_modules." in printed
    assert "precision: auto" in printed


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

    # The same model, frozen and linear-probed through the probe path every method shares.
    main(["fit", "--config", str(REPOSITORY / "configs/probe_encoder.yaml"), *TINY_DATA,
          "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "2",
          "--model.init_args.features.init_args.checkpoint", str(checkpoint)])  # fmt: skip
    rows = (root / "probe" / "version_0" / "probe_results.csv").read_text().splitlines()
    assert rows[1].startswith("embedding,,val,")


def test_diffusion_fit_sample_and_layers_through_the_cli(tmp_path, capsys):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root = tmp_path / "run"
    main(
        ["fit", "--config", str(REPOSITORY / "configs/diffusion.yaml"), *TINY_DATA,
         "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1",
         "--model.init_args.base_channels", "8", "--model.init_args.channel_mult", "[1, 2]",
         "--model.init_args.attention_resolutions", "[8]", "--model.init_args.num_heads", "2",
         "--model.init_args.sample_every_n_epochs", "1", "--model.init_args.sample_count", "4",
         "--model.init_args.sample_steps", "3"]
    )  # fmt: skip
    run = root / "diffusion" / "version_0"
    checkpoint = run / "checkpoints" / "last.ckpt"
    events = EventAccumulator(str(run)).Reload()
    assert {"diffusion/samples", "diffusion/real"} <= set(events.Tags()["images"])
    assert "val/loss" in events.Tags()["scalars"]

    capsys.readouterr()
    assert main(["features", "layers", "--checkpoint", str(checkpoint)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["enc.0.0", "16", "8"] and any(r.startswith("mid.0") for r in table)

    grid = tmp_path / "grid.png"
    assert main(["diffusion", "sample", "--checkpoint", str(checkpoint), "--n", "4",
                 "--steps", "3", "--out", str(grid)]) == 0  # fmt: skip
    assert Image.open(grid).size[0] > 2 * 16

    code = main(["features", "layers", "--checkpoint", str(checkpoint),
                 "--config", str(REPOSITORY / "configs/diffusion.yaml")])  # fmt: skip
    assert code == 2
    assert "base_channels is 8 in the checkpoint but 32 in the config" in capsys.readouterr().err

    # The probe config reads the newest diffusion checkpoint through its glob.
    probe = ["--config", str(REPOSITORY / "configs/probe_diffusion.yaml"), *TINY_DATA,
             "--model.init_args.features.init_args.checkpoint",
             str(root / "diffusion" / "version_*" / "checkpoints" / "last.ckpt"),
             "--model.init_args.features.init_args.timesteps", "[1, 10]"]  # fmt: skip
    main(["fit", *probe, "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "2"])
    probe_run = root / "probe" / "version_0"
    rows = (probe_run / "probe_results.csv").read_text().splitlines()
    keys = len(load_diffusion(checkpoint).ema.block_names) * 2
    assert len(rows) == 1 + keys and rows[0].startswith("layer,timestep,split,accuracy,macro_f1")
    assert (probe_run / "probe_heatmap_val_acc.png").exists()
    assert main(["features", "cluster", *probe, "--out", str(tmp_path / "clusters")]) == 0
    clusters = (tmp_path / "clusters" / "clustering.csv").read_text().splitlines()
    assert clusters[0] == "layer,timestep,nmi,ari,purity" and len(clusters) == 1 + keys


def test_features_layers_from_a_config(capsys):
    assert main(["features", "layers", "--config", str(REPOSITORY / "configs/diffusion.yaml")]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows[0] == ["enc.0.0", "32", "32"]
    assert ["mid.0", "8", "64"] in rows
