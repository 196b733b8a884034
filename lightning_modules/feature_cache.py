"""Frozen features extracted once per (feature source, split) and stored on disk as float16.

The cache key hashes the feature source's fingerprint (its weights and every setting: layers,
timesteps, pooling, noise) and the split's identity (the image cache it reads and which rows, with
which labels). Arrays are written under a temporary name and renamed into place, the index last,
so a half-written cache is never read; a changed setting gives another key.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from datamodules.cache import write_array_atomic, write_text_atomic
from datamodules.datamodule import PlanktonImages, keep_batch

from .features import FeatureKey, FeatureSource

FEATURE_CACHE_VERSION = 1


def split_fingerprint(dataset: PlanktonImages) -> str:
    """Which images, from which image cache, with which labels."""
    digest = hashlib.sha256(dataset.cache_path.name.encode())
    digest.update(np.ascontiguousarray(dataset.rows).tobytes())
    digest.update(np.ascontiguousarray(dataset.labels).tobytes())
    return digest.hexdigest()[:24]


def _key_text(key: FeatureKey) -> str:
    return json.dumps(list(key))


def load_or_extract(
    source: FeatureSource,
    dataset: PlanktonImages,
    cache_dir: str | Path,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    progress: bool = True,
    strategy: Strategy | None = None,
) -> dict[FeatureKey, torch.Tensor]:
    """``{key: (N, dim) float16}`` features of every image of ``dataset``, in dataset order.

    Under a multi-process ``strategy`` (every rank calls this together) each rank extracts one
    contiguous shard of the images; rank zero joins the shards into the cache, then every rank
    reads it. An image's features do not depend on its batch, so the cache is bit-identical to a
    single process's.
    """
    folder = Path(cache_dir) / "features"
    name = hashlib.sha256(f"{source.fingerprint()}:{split_fingerprint(dataset)}".encode())
    name = name.hexdigest()[:24]
    array_path, index_path = folder / f"{name}.npy", folder / f"{name}.json"
    loaded = _load(array_path, index_path, len(dataset), source)
    if loaded is not None:
        return loaded
    dims = source.feature_dims()
    total = sum(dims[key] for key in source.keys)
    size = len(dataset) * total * 2
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    rank_zero_info(
        f"feature cache: {len(dataset)} images x {total} features ({len(source.keys)} keys) "
        f"= {size / 2**20:.1f} MiB in {folder}"
    )
    if size > 0.95 * free:
        raise OSError(
            f"the feature cache needs {size / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB are "
            f"free in {folder}: free some space, set cache_dir elsewhere, or probe fewer "
            "layers/timesteps (or mode: online)"
        )

    def extract(images: Dataset) -> Callable[[np.ndarray], None]:
        def fill(array: np.ndarray) -> None:
            # Its own generator: extraction must not shift the global random stream that
            # shuffles training batches, or cached and online probes would see other batches.
            loader = DataLoader(
                images, batch_size, collate_fn=keep_batch, generator=torch.Generator()
            )
            row = 0
            for batch, _, indices in tqdm(loader, desc="extracting features", disable=not progress):
                features = source(batch.to(device), indices)
                block = torch.cat([features[key].float() for key in source.keys], dim=1)
                array[row : row + len(batch)] = block.cpu().numpy().astype(np.float16)
                row += len(batch)

        return fill

    world = strategy.world_size if strategy is not None else 1
    if world == 1:
        write_array_atomic(array_path, (len(dataset), total), np.float16, extract(dataset))
    else:
        shards = [folder / f"{name}.shard{r}of{world}.npy" for r in range(world)]
        rows = np.array_split(np.arange(len(dataset)), world)[strategy.global_rank]
        shard = Subset(dataset, rows.tolist())
        write_array_atomic(
            shards[strategy.global_rank], (len(rows), total), np.float16, extract(shard)
        )
        strategy.barrier("feature shards written")
        if strategy.is_global_zero:
            parts = [np.load(path, mmap_mode="r") for path in shards]

            def join(array: np.ndarray) -> None:
                array[:] = np.concatenate(parts)

            write_array_atomic(array_path, (len(dataset), total), np.float16, join)
            for path in shards:
                path.unlink()
    if strategy is None or strategy.is_global_zero:
        _write_index(index_path, source, dims, len(dataset))
    if world > 1:
        strategy.barrier("feature cache joined")
    loaded = _load(array_path, index_path, len(dataset), source)
    assert loaded is not None, f"feature cache {array_path} unreadable right after writing it"
    return loaded


def _write_index(
    index_path: Path, source: FeatureSource, dims: dict[FeatureKey, int], count: int
) -> None:
    """Written last: its presence says the array beside it is complete."""
    index = {
        "version": FEATURE_CACHE_VERSION,
        "settings": source.settings(),
        "count": count,
        "keys": [[_key_text(key), dims[key]] for key in source.keys],
    }
    write_text_atomic(index_path, json.dumps(index))


def _load(
    array_path: Path, index_path: Path, count: int, source: FeatureSource
) -> dict[FeatureKey, torch.Tensor] | None:
    if not (index_path.exists() and array_path.exists()):
        return None
    try:
        index = json.loads(index_path.read_text())
        array = np.load(array_path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    dims = source.feature_dims()
    expected = [[_key_text(key), dims[key]] for key in source.keys]
    if (
        index.get("version") != FEATURE_CACHE_VERSION
        or index.get("keys") != expected
        or array.shape != (count, sum(dims.values()))
    ):
        return None
    features, offset = {}, 0
    for key in source.keys:
        features[key] = torch.from_numpy(np.array(array[:, offset : offset + dims[key]]))
        offset += dims[key]
    return features
