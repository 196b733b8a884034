"""Files written so that a reader never sees half of one: every write goes to a temporary name
and is renamed into place once complete.

``ArrayStore`` is the protocol both caches (images, features) share: an ``.npy`` array, opened
memory-mapped, and a JSON index beside it. The index is written last, so a key whose index exists
is complete; a crash mid-write leaves nothing that could be read. What a key hashes and what the
index holds beyond its version and shape stay with each cache.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` under a temporary name and rename it into place."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(text)
    os.replace(staging, path)


def write_csv_atomic(
    path: str | Path, header: Sequence[str], rows: Iterable[Sequence[object]]
) -> None:
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


@dataclass(frozen=True)
class Stored:
    """A complete entry of an ``ArrayStore``: the memory-mapped array and its index."""

    array: np.ndarray
    index: dict


@dataclass(frozen=True)
class ArrayStore:
    """Arrays with a JSON index each, under ``folder``, keyed by a name the caller hashes.

    ``version`` is the caller's format version: an entry of another version is never read.
    """

    folder: Path
    version: int

    def array_path(self, key: str) -> Path:
        return self.folder / f"{key}.npy"

    def index_path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def load(self, key: str, shape: tuple[int, ...]) -> Stored | None:
        """The entry ``key`` if it is complete, of this version and of ``shape``; else None."""
        array_path, index_path = self.array_path(key), self.index_path(key)
        if not (index_path.exists() and array_path.exists()):
            return None
        try:
            index = json.loads(index_path.read_text())
            array = np.load(array_path, mmap_mode="r")
        except (OSError, ValueError):
            return None
        if index.get("version") != self.version or tuple(array.shape) != tuple(shape):
            return None
        return Stored(array, index)

    def write_array(
        self,
        key: str,
        shape: tuple[int, ...],
        dtype: np.dtype | type,
        fill: Callable[[np.ndarray], T],
    ) -> T:
        """The array of ``key``, atomically (see ``write_array_atomic``); not readable before
        ``commit``."""
        return write_array_atomic(self.array_path(key), shape, dtype, fill)

    def commit(self, key: str, index: dict) -> None:
        """Write the index last: from now on ``load`` returns the entry."""
        write_text_atomic(self.index_path(key), json.dumps({"version": self.version, **index}))

    def remove_others(self, key: str) -> None:
        """Delete every entry but ``key``, half-written ones included."""
        for path in self.folder.iterdir():
            if path.suffix in (".npy", ".json") and path.stem != key:
                path.unlink(missing_ok=True)
