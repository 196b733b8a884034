"""``plankton cache list`` and ``plankton cache clean``: what a cache folder holds, and removing
what no running process uses.

Nothing removes a cache automatically any more: a second cache of a source (other image size)
used to delete the first while a ``plankton fit`` was still reading it. Disk use is bounded by
running ``clean`` instead, which decides per entry (``datamodules/store.py`` describes the files):

- an entry with a live lease is kept whole. A lease from this host is live while its pid runs (a
  pid reused by an unrelated process keeps the entry: cleaning errs towards keeping). A lease from
  another host (a cache on a shared filesystem) cannot be checked from here: it counts as live
  for ``FOREIGN_LEASE_DAYS`` after it was taken, longer than any training run we expect;
- every other complete entry is removed once unused for ``unused_for_days`` (0: every entry not in
  use; all caches are rebuildable from the images and the model);
- an entry of another cache version, or one left incomplete (an array without its index, DDP
  shards, an index without its array, an unreadable index) is never read again: removed;
- a temporary (``.*.tmp``) is removed once the process writing it has ended (same host, pid gone),
  or, when its writer cannot be checked, once older than ``STALE_TEMPORARY_DAYS``;
- leases of processes that ended (killed: ``atexit`` never ran) are removed.

Only ``images/<source>/`` and ``features/`` are looked at, and only files following the store's
naming; synthetic datasets and anything else under the cache folder are never touched. Every
removal is returned with its size and reason, and ``dry_run`` returns the same list removing
nothing.
"""

from __future__ import annotations

import json
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from datamodules.cache import CACHE_VERSION
from datamodules.store import LEASE_MARK, ArrayStore, runs_here, token_owner
from lightning_modules.probes.feature_cache import FEATURE_CACHE_VERSION

DAY = 86400.0
FOREIGN_LEASE_DAYS = 7.0
STALE_TEMPORARY_DAYS = 1.0

_SHARD = re.compile(r"^[^.]+\.shard\d+of\d+\.npy$")


class Removal(NamedTuple):
    """A file ``clean_caches`` removed (or would remove, under ``dry_run``)."""

    path: Path
    size: int
    reason: str


@dataclass(frozen=True)
class CacheEntry:
    """One key of a cache store, with every file that belongs to it.

    ``state`` is ``complete`` (readable by this version), ``older version`` or ``incomplete``;
    ``last_used`` (seconds since the epoch) is the newest modification of its files: opening an
    entry touches its index. ``used_by`` lists the live leases as ``pid@host``.
    """

    kind: str
    store: ArrayStore
    key: str
    state: str
    description: str
    size: int
    last_used: float
    used_by: tuple[str, ...]
    files: tuple[Path, ...]


def list_caches(cache_dir: str | Path) -> list[CacheEntry]:
    """Every entry of the image and feature caches under ``cache_dir``, store by store."""
    now = time.time()
    cache_dir = Path(cache_dir).expanduser()
    stores = [
        ("images", ArrayStore(folder, CACHE_VERSION))
        for folder in _subfolders(cache_dir / "images")
    ]
    stores.append(("features", ArrayStore(cache_dir / "features", FEATURE_CACHE_VERSION)))
    entries = []
    for kind, store in stores:
        folder = store.folder
        if not folder.is_dir():
            continue
        keys: dict[str, list[Path]] = {}
        for path in sorted(folder.iterdir()):
            key = _key_of(path.name)
            if key is not None and path.is_file():
                keys.setdefault(key, []).append(path)
        for key, files in keys.items():
            state, description = _describe(kind, store, key)
            stats = [path.stat() for path in files if path.exists()]
            entries.append(
                CacheEntry(
                    kind=kind,
                    store=store,
                    key=key,
                    state=state,
                    description=description,
                    size=sum(s.st_size for s in stats),
                    last_used=max((s.st_mtime for s in stats), default=0.0),
                    used_by=tuple(_live_leases(folder, key, now)),
                    files=tuple(files),
                )
            )
    return entries


def clean_caches(
    cache_dir: str | Path, dry_run: bool = False, unused_for_days: float = 0.0
) -> list[Removal]:
    """Remove the cache files no running process uses (the rules are in the module docstring)
    and return each with its size and reason; with ``dry_run``, the same list, nothing removed.

    Leases are read again just before an entry is removed, so a process that opened it since
    the listing keeps it. An index goes before its array, so a reader racing the removal finds
    an incomplete entry and rebuilds it rather than an index whose array is gone.
    """
    now = time.time()
    removals = []
    for entry in list_caches(cache_dir):
        for path, reason in _doomed(entry, now, unused_for_days):
            try:
                size = path.stat().st_size
                if not dry_run:
                    path.unlink()
            except FileNotFoundError:
                continue  # removed meanwhile (its writer renamed it, or another clean)
            removals.append(Removal(path, size, reason))
    return removals


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def _key_of(name: str) -> str | None:
    """The key a store file belongs to, or None for a file the store does not write."""
    key = name.removeprefix(".").split(".", 1)[0]
    if name.startswith(".") and name.endswith(".tmp"):
        return key
    if name in (f"{key}.npy", f"{key}.json") or _SHARD.match(name):
        return key
    if name.startswith(f"{key}{LEASE_MARK}"):
        return key
    return None


def _alive(owner: tuple[int, str], mtime: float, now: float) -> bool:
    """Whether the process that wrote a file of age ``now - mtime`` may still run: checked by
    pid on this host, guessed from the age for another host's."""
    pid, host = owner
    if host != socket.gethostname():
        return now - mtime < FOREIGN_LEASE_DAYS * DAY
    return runs_here(pid)


def _live_leases(folder: Path, key: str, now: float) -> list[str]:
    """``pid@host`` of every live lease on ``key``, read from the disk each time (never cached:
    a process may have opened the entry since the last look)."""
    live = []
    for path in folder.glob(f"{key}{LEASE_MARK}*"):
        token = path.name.split(LEASE_MARK, 1)[1]
        owner = token_owner(token)
        try:
            if owner is not None and _alive(owner, path.stat().st_mtime, now):
                live.append(token)
        except FileNotFoundError:
            continue  # released meanwhile
    return sorted(live)


def _describe(kind: str, store: ArrayStore, key: str) -> tuple[str, str]:
    """``(state, what the entry caches)``, from its index."""
    index_path, array_path = store.index_path(key), store.array_path(key)
    if not index_path.exists():
        if array_path.exists():
            return "incomplete", "array without index (an interrupted build)"
        return "incomplete", "no array yet (being built, or an interrupted build)"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        return "incomplete", "unreadable index"
    if not store.is_current(index):
        return (
            "older version",
            f"cache version {index.get('version')}; this one reads {store.version}",
        )
    if not array_path.exists():
        return "incomplete", "index without its array"
    if kind == "images":
        settings = ", ".join(f"{k}={v}" for k, v in index["settings"].items())
        return "complete", f"{index['source']}: {index['shape'][0]} images, {settings}"
    settings = json.dumps(index["settings"], sort_keys=True)
    return "complete", f"{len(index['keys'])} feature blocks of {settings}"


def _doomed(entry: CacheEntry, now: float, unused_for_days: float) -> list[tuple[Path, str]]:
    """The files of ``entry`` to remove, each with its reason: the index first."""
    leftovers = [item for path in entry.files if (item := _leftover(path, now)) is not None]
    if _live_leases(entry.store.folder, entry.key, time.time()):
        return leftovers
    if entry.state == "complete":
        if now - entry.last_used < unused_for_days * DAY:
            return leftovers
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
        reason = f"not in use, last used {when}"
    else:
        reason = f"{entry.state}: {entry.description}"
    index, array = entry.store.index_path(entry.key), entry.store.array_path(entry.key)
    doomed = [(path, reason) for path in (index, array) if path in entry.files]
    shard = "DDP shard of an interrupted feature extraction"
    doomed += [(path, shard) for path in entry.files if _SHARD.match(path.name)]
    return doomed + leftovers


def _leftover(path: Path, now: float) -> tuple[Path, str] | None:
    """A temporary or lease whose process has ended, with the reason; None for other files."""
    if LEASE_MARK in path.name:
        owner = token_owner(path.name.split(LEASE_MARK, 1)[1])
        if owner is None or not _alive(owner, _mtime(path), now):
            return path, "lease of a process that has ended"
        return None
    if not path.name.endswith(".tmp"):
        return None
    owner = token_owner(path.name.removesuffix(".tmp"))
    if owner is not None and owner[1] == socket.gethostname():
        if _alive(owner, _mtime(path), now):
            return None
        return path, f"temporary of process {owner[0]}, which has ended"
    age = now - _mtime(path)
    if age > STALE_TEMPORARY_DAYS * DAY:
        return path, f"temporary untouched for {age / DAY:.1f} days"
    return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0  # removed meanwhile: counts as long gone
