"""Frozen features extracted once per (feature source, split) and stored on disk as float16.

The cache key hashes the feature source's fingerprint (its weights and every setting: layers,
timesteps, pooling, noise) and the split's identity (the image cache it reads and which rows, with
which labels), so a changed setting gives another key. The cache is an ``ArrayStore`` entry (one
float16 column block per key, in the source's key order), so a half-written cache is never read,
one whose checksum no longer matches is extracted again, and one a running process holds a lease
on is never removed by ``plankton cache clean``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.strategies import Strategy
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from datamodules.images import PlanktonImages, keep_batch
from datamodules.store import ArrayStore, write_array_atomic

from .features import FeatureKey, FeatureSource

FEATURE_CACHE_VERSION = 2  # 2: the index holds the array's checksum


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
    store = ArrayStore(Path(cache_dir) / "features", FEATURE_CACHE_VERSION)
    folder = store.folder
    name = hashlib.sha256(f"{source.fingerprint()}:{split_fingerprint(dataset)}".encode())
    name = name.hexdigest()[:24]
    dims = source.feature_dims()
    total = sum(dims[key] for key in source.keys)
    loaded = _load(store, name, len(dataset), source)
    if loaded is not None:
        return loaded
    store.check_space(
        len(dataset) * total * 2,  # float16
        "feature cache",
        f"{len(dataset)} images x {total} features ({len(source.keys)} keys)",
        "set cache_dir elsewhere, or probe fewer layers/timesteps (or mode: online)",
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
        store.write_array(name, (len(dataset), total), np.float16, extract(dataset))
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

            store.write_array(name, (len(dataset), total), np.float16, join)
            for path in shards:
                path.unlink()
    if strategy is None or strategy.is_global_zero:
        store.commit(name, {"settings": source.settings(), "keys": _key_index(source)})
    if world > 1:
        strategy.barrier("feature cache joined")
    loaded = _load(store, name, len(dataset), source)
    assert loaded is not None, f"feature cache {store.array_path(name)} unreadable after writing"
    return loaded


def _key_index(source: FeatureSource) -> list[list]:
    """The index's record of the column blocks: each key and its width, in order."""
    dims = source.feature_dims()
    return [[_key_text(key), dims[key]] for key in source.keys]


def _load(
    store: ArrayStore, name: str, count: int, source: FeatureSource
) -> dict[FeatureKey, torch.Tensor] | None:
    dims = source.feature_dims()
    stored = store.load(name, (count, sum(dims.values())))
    if stored is None or stored.index.get("keys") != _key_index(source):
        return None
    features, offset = {}, 0
    for key in source.keys:
        features[key] = torch.from_numpy(np.array(stored.array[:, offset : offset + dims[key]]))
        offset += dims[key]
    return features
