"""k-means of the frozen features a probe config describes, at every key, scored against the
labels (``plankton features cluster`` and the experiment's clustering stage)."""

from __future__ import annotations

from pathlib import Path

import torch

from datamodules.store import write_csv_atomic
from lightning_modules.common.figures import heatmap_figure, save_figure
from lightning_modules.probes.clustering import cluster_scores
from lightning_modules.probes.feature_cache import load_or_extract

from .lightning_cli import PlanktonCLI

SCORES = ("nmi", "ari", "purity")


def clustering_split(requested: str, summary: dict) -> str | None:
    """The split an experiment clusters: ``requested``, or, when the data has that split but no
    image in it (a season split has no test), the first evaluation set it has, so the stage
    still compares the feature sources; None when the data has no evaluation set at all.

    ``summary`` is the data stage's summary of the pretraining regime. A split the data does not
    know is kept: reading it names the valid ones.
    """
    counts = summary["counts"].get(requested)
    if counts is None or sum(counts.values()):
        return requested
    return next(iter(summary.get("eval_sets", ())), None)  # none in runs of earlier versions


def cluster_features(
    config: str | Path,
    out: str | Path,
    split: str = "test",
    k: int | None = None,
    seed: int = 0,
    overrides: list[str] | None = None,
) -> dict:
    """Write ``clustering.csv`` (one row per key) and a heatmap per score into ``out``.

    ``config`` is a probe config; ``overrides`` are CLI options (``--data.image_size 16``,
    ``--trainer.precision 32-true``) applied on top, as in ``plankton fit``. ``k`` defaults to
    the number of classes. Returns the row with the best NMI.
    """
    cli = PlanktonCLI(args=["--config", str(config), *(overrides or [])], run=False)
    datamodule, source = cli.datamodule, cli.model.features
    dataset = datamodule.dataset(split)
    cache_dir = cli.model.feature_cache_dir(datamodule)
    features = load_or_extract(source, dataset, cache_dir, progress=True)
    rows = cluster_scores(features, dataset.labels, k or datamodule.num_classes, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(out / "clustering.csv", list(rows[0]), [list(row.values()) for row in rows])
    for score in SCORES:
        values = torch.tensor([row[score] for row in rows])
        figure = heatmap_figure(list(features), values, f"k-means {score} ({split})")
        save_figure(figure, out / f"clustering_{score}.png")
    return max(rows, key=lambda row: row["nmi"])
