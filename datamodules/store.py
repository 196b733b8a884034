"""Files written so that a reader never sees half of one: every write goes to a temporary name
and is renamed into place once complete.

``ArrayStore`` is the protocol both caches (images, features) share: an ``.npy`` array, opened
memory-mapped, and a JSON index beside it. The index is written last, so a key whose index exists
is complete; a crash mid-write leaves nothing that could be read. What a key hashes and what the
index holds beyond its version, shape and checksum stays with each cache.

Two guards make a shared cache folder safe for concurrent runs:

- the index holds a checksum of the array file, verified the first time a process opens the
  entry, so a flipped bit on disk is rebuilt instead of silently feeding a model wrong pixels;
- a process that opens or builds an entry holds a *lease* on it, a file
  ``<key>.lease.<pid>@<host>`` removed at exit, so ``plankton cache clean`` (in
  ``workflows/caches.py``) never removes an entry a running process still reads.

Nothing here deletes an entry: rebuilding renames a new array over the old name, so a process
holding a memory map of the old file keeps reading its (unlinked) inode.
"""

from __future__ import annotations

import atexit
import csv
import hashlib
import io
import json
import os
import shutil
import socket
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from lightning.pytorch.utilities import rank_zero_info

T = TypeVar("T")

LEASE_MARK = ".lease."

# Array files this process has checksummed, as (path, inode, size, mtime_ns, checksum): an entry
# is verified on its first opening only, since hashing a multi-GB array on every open (or every
# epoch) would cost more than the cache saves. Tests clear it to verify again.
verified: set[tuple[str, int, int, int, str]] = set()

# Lease files this process holds, with the pid that took them: a forked child inherits this
# dict and must not release its parent's leases.
_held: dict[Path, int] = {}


def owner_token() -> str:
    """``<pid>@<host>``: names the temporaries, leases and run locks of this process, so that
    another can tell whether the process that wrote them is still running."""
    return f"{os.getpid()}@{socket.gethostname()}"


def token_owner(token: str) -> tuple[int, str] | None:
    """``(pid, host)`` from the end of a name ``...<pid>@<host>``, or None (an older name)."""
    head, at, host = token.rpartition("@")
    pid = head.rsplit(".", 1)[-1]
    return (int(pid), host) if at and pid.isdigit() else None


def runs_here(pid: int) -> bool:
    """Whether process ``pid`` of this host is running (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_path(path: Path) -> Path:
    """The temporary name ``path`` is written under before it is renamed into place. It names
    this process, so that ``plankton cache clean`` can tell a live writer's file from one left
    by a process that died."""
    return path.with_name(f".{path.name}.{owner_token()}.tmp")


def write_atomic(path: str | Path, write: Callable[[Path], T]) -> T:
    """Let ``write`` write the file at the path it is given, then rename that file to ``path``:
    a reader sees the old file or the whole new one, never a part. Returns what ``write``
    returns; on an error the temporary is removed, and an error that names no file (a full
    disk) is raised naming the folder."""
    path = Path(path)
    staging = staging_path(path)
    try:
        result = write(staging)
        os.replace(staging, path)
    except OSError as error:
        if error.filename is not None:
            raise
        # A failed write() names no file ("No space left on device"): name the folder.
        raise OSError(error.errno, error.strerror or str(error), str(path.parent)) from None
    finally:
        staging.unlink(missing_ok=True)
    return result


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` under a temporary name and rename it into place."""
    write_atomic(path, lambda staging: staging.write_text(text))


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
    write it, and rename it into place only once it is complete. Returns what ``fill`` returns.

    The rename gives ``path`` a new inode: a reader holding a memory map of the file it replaces
    keeps reading the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def create(staging: Path) -> T:
        array = np.lib.format.open_memmap(staging, mode="w+", dtype=dtype, shape=shape)
        result = fill(array)
        array.flush()
        del array  # the map is closed before the rename
        return result

    return write_atomic(path, create)


def file_checksum(path: Path) -> str:
    """blake2b of the file's bytes (the ``.npy`` header included), read in chunks so memory
    stays flat however large the array."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "blake2b").hexdigest()


def _verified_token(path: Path, stat: os.stat_result, checksum: str) -> tuple:
    """What identifies an array file whose checksum was verified: a rewrite changes it."""
    return (str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, checksum)


def release_leases() -> None:
    """Remove the leases this process took (run at exit; a killed process leaves them, and
    cleaning recognises them as stale)."""
    for path, pid in list(_held.items()):
        if pid == os.getpid():
            path.unlink(missing_ok=True)
            del _held[path]


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

    def check_space(self, size: int, name: str, contents: str, advice: str) -> None:
        """Print the ``size`` in bytes of the entry about to be written (``name``: what the
        store holds; ``contents``: the entry in words), and refuse a disk that cannot hold it
        rather than fail halfway through a long build; ``advice`` says what else to do."""
        self.folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.folder).free
        rank_zero_info(f"{name}: {contents} = {size / 2**20:.1f} MiB in {self.folder}")
        if size > 0.95 * free:
            raise OSError(
                f"the {name} needs {size / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB are "
                f"free in {self.folder}: free some space, {advice}"
            )

    def is_current(self, index: dict) -> bool:
        """Whether an index is of this store's version. One without a checksum comes from
        before checksums: stale, like another version."""
        return index.get("version") == self.version and "checksum" in index

    def lease(self, key: str) -> None:
        """Mark ``key`` as used by this process until it exits, so cleaning keeps it.

        Taken before the entry is opened or built (a build's temporaries and shards belong to
        its key too). A folder this user cannot write (a read-only shared cache) gets no lease:
        a warning says that cleaning by someone else could then remove the entry."""
        path = self.folder / f"{key}{LEASE_MARK}{owner_token()}"
        if path in _held:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            path.touch()
        except OSError as error:
            warnings.warn(
                f"{path}: cannot take a lease ({error}); `plankton cache clean` run by another "
                "user may remove this cache while it is in use",
                stacklevel=3,
            )
            return
        if not _held:
            atexit.register(release_leases)
        _held[path] = os.getpid()

    def load(self, key: str, shape: tuple[int, ...]) -> Stored | None:
        """The entry ``key`` if it is complete, of this version and of ``shape``, and its array
        matches the index's checksum; else None (the caller rebuilds it). Leases ``key``."""
        self.lease(key)
        array_path, index_path = self.array_path(key), self.index_path(key)
        if not (index_path.exists() and array_path.exists()):
            return None
        try:
            index = json.loads(index_path.read_text())
            array = np.load(array_path, mmap_mode="r")
            stat = array_path.stat()
        except (OSError, ValueError):
            return None
        if not self.is_current(index) or tuple(array.shape) != tuple(shape):
            return None
        token = _verified_token(array_path, stat, index["checksum"])
        if token not in verified:
            if file_checksum(array_path) != index["checksum"]:
                warnings.warn(f"{array_path}: checksum mismatch, rebuilding", stacklevel=3)
                return None
            verified.add(token)
        try:  # marks the entry as used, for `plankton cache list` and `clean --unused-for`
            os.utime(index_path)
        except OSError:
            pass  # a read-only shared cache: the last use stays unknown, the entry is fine
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
        self.lease(key)
        return write_array_atomic(self.array_path(key), shape, dtype, fill)

    def commit(self, key: str, index: dict) -> None:
        """Checksum the written array and write the index last: from now on ``load`` returns
        the entry. The array is already verified for this process: it was just hashed."""
        array_path = self.array_path(key)
        stat = array_path.stat()
        checksum = file_checksum(array_path)
        write_text_atomic(
            self.index_path(key),
            json.dumps({"version": self.version, **index, "checksum": checksum}),
        )
        verified.add(_verified_token(array_path, stat, checksum))
