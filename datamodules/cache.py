"""The on-disk cache of preprocessed images: decode every file once, read epochs from memory.

A cache is a ``.npy`` array of uint8 images ``(N, C, S, S)`` opened memory-mapped, plus a JSON
index. Its key hashes the preprocessing settings and every file's path, size and modification
time, so a changed file or setting gives another key and the stale cache is never used. Both files
are written under temporary names and renamed into place, the index last: a cache whose index
exists is complete, and a crash mid-build leaves nothing that could be read.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
from tqdm import tqdm

from .preprocessing import ImageReadError, Preprocessing, load_preprocessed
from .sources import ImageRecord, Skipped

CACHE_VERSION = 1
T = TypeVar("T")


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
    """The cache of ``records`` under ``settings``, built if absent or stale.

    ``source_name`` groups the caches of one dataset: building a new one removes that dataset's
    stale caches, so disk use stays bounded.
    """
    folder = Path(cache_dir) / "images" / hashlib.sha256(source_name.encode()).hexdigest()[:16]
    key = cache_key(records, settings)
    array_path, index_path = folder / f"{key}.npy", folder / f"{key}.json"
    cached = _load(array_path, index_path, len(records), settings)
    if cached is not None:
        return cached
    shape = (len(records), settings.channels, settings.image_size, settings.image_size)
    failed = write_array_atomic(
        array_path,
        shape,
        np.uint8,
        lambda images: _fill(images, records, settings, num_workers, progress),
    )
    index = {
        "version": CACHE_VERSION,
        "source": source_name,
        "settings": settings.as_dict(),
        "shape": list(shape),
        "failed": [[i, reason] for i, reason in failed],
        "files": [str(r.path) for r in records],
    }
    write_text_atomic(index_path, json.dumps(index))
    for stale in folder.iterdir():
        if stale.suffix in (".npy", ".json") and stale.stem != key:
            stale.unlink(missing_ok=True)
    cached = _load(array_path, index_path, len(records), settings)
    assert cached is not None, f"cache {array_path} unreadable right after writing it"
    return cached


def _load(
    array_path: Path, index_path: Path, count: int, settings: Preprocessing
) -> CachedImages | None:
    if not (index_path.exists() and array_path.exists()):
        return None
    try:
        index = json.loads(index_path.read_text())
        images = np.load(array_path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    expected = (count, settings.channels, settings.image_size, settings.image_size)
    if index.get("version") != CACHE_VERSION or tuple(images.shape) != expected:
        return None
    readable = np.ones(count, dtype=bool)
    failed = []
    for i, reason in index["failed"]:
        readable[i] = False
        failed.append(Skipped(index["files"][i], reason))
    return CachedImages(images=images, readable=readable, failed=failed, path=array_path)


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


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` under a temporary name and rename it into place."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(text)
    os.replace(staging, path)


def write_csv_atomic(path: Path, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """A CSV file (quoted as the csv module quotes), written atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def write_array_atomic(
    path: Path, shape: tuple[int, ...], dtype: np.dtype | type, fill: Callable[[np.ndarray], T]
) -> T:
    """Create the ``.npy`` array ``path`` memory-mapped under a temporary name, let ``fill``
    write it, and rename it into place only once it is complete. Returns what ``fill`` returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.stem}.{os.getpid()}.npy.tmp")
    try:
        array = np.lib.format.open_memmap(staging, mode="w+", dtype=dtype, shape=shape)
        result = fill(array)
        array.flush()
        del array
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return result
