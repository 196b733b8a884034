"""The on-disk cache of preprocessed images: decode every file once, read epochs from memory.

A cache is an ``ArrayStore`` entry: uint8 images ``(N, C, S, S)`` opened memory-mapped (row ``i``
is the ``i``-th record), and an index listing the files that failed to decode. Its key hashes the
preprocessing settings and every file's path, size and modification time, so a changed file or
setting gives another key and the stale cache is never used.

A stale cache is not deleted here: another process (a ``plankton fit`` on the same source) may be
reading it. ``plankton cache clean`` removes the caches no running process holds a lease on.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .preprocessing import ImageReadError, Preprocessing, load_preprocessed
from .sources import ImageRecord, Skipped
from .store import ArrayStore

# 2: the index holds the array's checksum. 3: it lists only the files that failed: a list of
# every file made it grow with the dataset, and writing and parsing it took about 300 bytes of
# memory an image at every build and load (benchmarks/scale.py), beyond the scanned records.
CACHE_VERSION = 3


def default_cache_dir() -> Path:
    """``$PLANKTON_CACHE``, else ``~/.cache/plankton``."""
    return Path(os.environ.get("PLANKTON_CACHE", Path.home() / ".cache" / "plankton"))


@dataclass
class CachedImages:
    """Preprocessed images aligned with the records they were built from.

    ``readable[i]`` is False for a record whose file could not be decoded; its reason is in
    ``failed``. Those slots hold zeros and must not be used.
    """

    images: np.ndarray
    readable: np.ndarray
    failed: list[Skipped]
    path: Path


def cache_key(records: list[ImageRecord], settings: Preprocessing) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_VERSION, settings.as_dict()], sort_keys=True).encode())
    for record in records:
        try:
            stat = record.path.stat()
            digest.update(f"{record.path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{record.path}\0missing\n".encode())
    return digest.hexdigest()[:24]


def load_or_build(
    records: list[ImageRecord],
    settings: Preprocessing,
    cache_dir: str | Path,
    source_name: str,
    num_workers: int = 0,
    progress: bool = True,
) -> CachedImages:
    """The cache of ``records`` under ``settings``, built if absent, stale or corrupt (its
    checksum is verified on first use in a process).

    ``source_name`` groups the caches of one dataset in one folder, so ``plankton cache list``
    shows them together; no cache is removed here (see the module docstring).
    """
    folder = Path(cache_dir) / "images" / hashlib.sha256(source_name.encode()).hexdigest()[:16]
    store = ArrayStore(folder, CACHE_VERSION)
    key = cache_key(records, settings)
    shape = (len(records), settings.channels, settings.image_size, settings.image_size)
    cached = _load(store, key, shape)
    if cached is not None:
        return cached
    count, channels, side, _ = shape
    store.check_space(
        int(np.prod(shape)),  # one byte a pixel; the index lists only failures
        "image cache",
        f"{count} images x {channels}x{side}x{side} px",
        "set data.cache_dir (or $PLANKTON_CACHE) elsewhere, or use a smaller image_size",
    )
    failed = store.write_array(
        key, shape, np.uint8, lambda images: _fill(images, records, settings, num_workers, progress)
    )
    store.commit(
        key,
        {
            "source": source_name,
            "settings": settings.as_dict(),
            "shape": list(shape),
            "failed": [[i, str(records[i].path), reason] for i, reason in failed],
        },
    )
    cached = _load(store, key, shape)
    assert cached is not None, f"cache {store.array_path(key)} unreadable right after writing it"
    return cached


def _load(store: ArrayStore, key: str, shape: tuple[int, ...]) -> CachedImages | None:
    stored = store.load(key, shape)
    if stored is None:
        return None
    readable = np.ones(shape[0], dtype=bool)
    failed = []
    for i, path, reason in stored.index["failed"]:
        readable[i] = False
        failed.append(Skipped(path, reason))
    return CachedImages(stored.array, readable, failed, store.array_path(key))


def _decode(path: Path, settings: Preprocessing) -> np.ndarray | str:
    try:
        return load_preprocessed(path, settings)
    except ImageReadError as error:
        return str(error)
    except FileNotFoundError:
        return "file disappeared while building the cache"


def _fill(
    images: np.ndarray,
    records: list[ImageRecord],
    settings: Preprocessing,
    num_workers: int,
    progress: bool,
) -> list[tuple[int, str]]:
    paths = [r.path for r in records]
    work = partial(_decode, settings=settings)
    failed = []
    bar = tqdm(total=len(paths), desc="preprocessing images", disable=not progress, unit="img")
    with ProcessPoolExecutor(num_workers) if num_workers > 1 else _InProcess() as pool:
        for i, result in enumerate(pool.map(work, paths, chunksize=64)):
            if isinstance(result, str):
                failed.append((i, result))
            else:
                images[i] = result
            bar.update()
    bar.close()
    return failed


class _InProcess:
    """The ``map`` of an executor, run in this process (no worker start-up for small sets)."""

    def __enter__(self) -> _InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def map(self, fn: Callable, items: Iterable, chunksize: int = 1) -> Iterator:
        return map(fn, items)
