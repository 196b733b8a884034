"""An experiment on data without a test split (a season split: train, val and one
out-of-distribution set) runs every stage and reports what it has."""

import csv
import json

from conftest import REPOSITORY, TINY_DIFFUSION

from cli import main
from workflows.clustering import clustering_split
from workflows.layout import STAGES

CONFIGS = REPOSITORY / "configs"
EXPERIMENT = """
name: season_split
data: {data}
data_overrides: {{image_size: 16, batch_size: 8, max_per_class: 10, progress: false}}
regimes: [long_tailed]
trainer_overrides: {{precision: 32-true, enable_progress_bar: false, enable_model_summary: false}}
{diffusion}
baselines:  # a classifier itself: tested end to end in the baselines stage
  supervised:
    config: {configs}/supervised.yaml
    max_epochs: 1
    overrides: {{model.init_args.backbone: resnet10t}}
probes:
  diffusion:
    config: {configs}/probe_diffusion.yaml
    max_epochs: 1
    overrides:
      model.init_args.features.init_args.layers: ["mid.*"]
      model.init_args.features.init_args.timesteps: [1]
      model.init_args.weight_decay: 0.001
  encoder:
    config: {configs}/probe_encoder.yaml
    max_epochs: 1
    overrides: {{model.init_args.weight_decay: 0.001}}
  pixels:
    config: {configs}/probe_pixels.yaml
    max_epochs: 1
    overrides: {{model.init_args.weight_decay: 0.001}}
clustering: {{split: test}}
samples: 4
"""


def _season_split(folder):
    """A manifest of train, val and ``test_ood_temporal``, and no row for test."""
    assert main(["data", "synth", "--out", str(folder), "--classes", "3", "--per-class", "16",
                 "--size", "32", "--domains", "source,temporal"]) == 0  # fmt: skip
    with open(folder / "manifest.csv", newline="") as handle:
        header, *rows = list(csv.reader(handle))
    split = header.index("split")
    for i, row in enumerate(rows):
        if row[split]:
            row[split] = "test_ood_temporal"
        else:
            row[split] = "val" if i % 4 == 0 else "train"
    manifest = folder / "season.csv"
    with open(manifest, "w", newline="") as handle:
        csv.writer(handle).writerows([header, *rows])
    data = folder / "season.yaml"
    data.write_text(f"source: {manifest}\n")
    return data


def test_an_experiment_without_a_test_split_runs_every_stage(tmp_path, capsys):
    config = tmp_path / "season.yaml"
    config.write_text(
        EXPERIMENT.format(
            data=_season_split(tmp_path / "data"),
            configs=CONFIGS,
            diffusion=TINY_DIFFUSION.format(configs=CONFIGS),
        )
    )
    out = tmp_path / "run"
    assert main(["experiment", "--config", str(config), "--out", str(out)]) == 0
    assert all((out / stage / "done.json").exists() for stage in STAGES)
    log = capsys.readouterr().out
    assert "k-means on test_ood_temporal" in log

    records = json.loads((out / "results.json").read_text())
    assert {r["eval_set"] for r in records} == {"test_ood_temporal"}
    assert {r["method"] for r in records} >= {
        "diffusion best (layer, t)",
        "raw pixels (logistic regression)",
    }
    run = json.loads((out / "runs" / "supervised_long_tailed" / "results.json").read_text())
    assert run["eval_sets"] == ["test_ood_temporal"]
    assert "planted_error" not in run["abundance"]["test_ood_temporal"]
    assert (out / "clustering" / "diffusion" / "clustering.csv").exists()

    report = (out / "report.md").read_text()
    assert "No test split in the data" in report
    assert "k-means on the `test_ood_temporal` split" in report
    assert "| test_ood_temporal acc |" in report


def test_clustering_falls_back_to_the_first_eval_set_the_data_has():
    counts = {"train": {"a": 3}, "val": {"a": 1}, "test": {"a": 0}, "temporal": {"a": 2}}
    assert clustering_split("test", {"counts": counts, "eval_sets": ["temporal"]}) == "temporal"
    assert clustering_split("val", {"counts": counts, "eval_sets": ["temporal"]}) == "val"
    assert clustering_split("test", {"counts": counts, "eval_sets": []}) is None
    # A split the data does not know is kept: reading it names the valid ones.
    assert clustering_split("tset", {"counts": counts, "eval_sets": ["temporal"]}) == "tset"
