"""Faults the caches must survive: a flipped byte on disk, a second cache of a source built while
the first is read, cleaning while another process reads, a process killed mid-extraction."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from conftest import REPOSITORY, write_class_folders
from planted import PlantedFeatures, write_planted_images

from datamodules import PlanktonDataModule
from datamodules.cache import load_or_build
from datamodules.preprocessing import Preprocessing
from datamodules.sources import scan
from datamodules.store import ArrayStore, release_leases, verified
from lightning_modules.probes.feature_cache import load_or_extract
from workflows.caches import clean_caches, list_caches

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPOSITORY), str(REPOSITORY / "tests")])}

LOAD_IMAGES = """
import sys
from datamodules.cache import load_or_build
from datamodules.preprocessing import Preprocessing
from datamodules.sources import scan
records = scan(sys.argv[1]).records
load_or_build(records, Preprocessing(image_size=16), sys.argv[2], "src", progress=False)
"""

SLOW_EXTRACTION = """
import sys, time
from planted import PlantedFeatures
from datamodules import PlanktonDataModule
from lightning_modules.probes.feature_cache import load_or_extract

class Slow(PlantedFeatures):  # same settings and weights, so the same cache key
    def forward(self, images, indices):
        time.sleep(0.2)
        return super().forward(images, indices)

data = PlanktonDataModule(
    source=sys.argv[1], image_size=8, cache_dir=sys.argv[2], progress=False, polarity="keep"
)
load_or_extract(Slow(), data.dataset("train"), sys.argv[3], batch_size=2, progress=False)
"""


@pytest.fixture
def folder(tmp_path):
    return write_class_folders(tmp_path / "images", per_class=3)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return write_planted_images(tmp_path_factory.mktemp("planted"), per_class=6)


def _build(folder, cache_dir, size=16):
    records = scan(folder).records
    return load_or_build(records, Preprocessing(image_size=size), cache_dir, "src", progress=False)


def _train_split(planted, cache_dir):
    data = PlanktonDataModule(
        source=str(planted), image_size=8, cache_dir=str(cache_dir), progress=False, polarity="keep"
    )
    return data.dataset("train")


def _flip_a_data_byte(path):
    """Flip one byte of the array's data (past the ``.npy`` header), keeping the modification
    time, as bit rot on a disk would."""
    stat = path.stat()
    with open(path, "r+b") as handle:
        np.lib.format.read_magic(handle)
        np.lib.format.read_array_header_1_0(handle)
        offset = handle.tell() + 7
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ 0xFF]))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _mismatch(path):
    return re.escape(f"{path}: checksum mismatch, rebuilding")


def _bits(features):
    return {key: value.view(torch.int16) for key, value in features.items()}


def test_a_flipped_byte_in_the_image_cache_is_named_and_rebuilt(folder, tmp_path):
    first = _build(folder, tmp_path / "cache")
    original = np.array(first.images)
    _flip_a_data_byte(first.path)
    # This process verified the entry when it built it and does not hash it again.
    assert not np.array_equal(np.asarray(_build(folder, tmp_path / "cache").images), original)

    # A new process verifies it, says which file is corrupt, and rebuilds it.
    result = subprocess.run(
        [sys.executable, "-c", LOAD_IMAGES, str(folder), str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(_mismatch(first.path), result.stderr)
    verified.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt cache verifies
        rebuilt = _build(folder, tmp_path / "cache")
    assert rebuilt.path == first.path and np.array_equal(np.asarray(rebuilt.images), original)

    # The same, within one process, once it forgets what it verified.
    _flip_a_data_byte(first.path)
    verified.clear()
    with pytest.warns(UserWarning, match=_mismatch(first.path)):
        rebuilt = _build(folder, tmp_path / "cache")
    assert np.array_equal(np.asarray(rebuilt.images), original)


def test_a_flipped_byte_in_the_feature_cache_is_named_and_extracted_again(planted, tmp_path):
    dataset = _train_split(planted, tmp_path / "cache")
    source = PlantedFeatures()
    first = load_or_extract(source, dataset, tmp_path / "fc", progress=False)
    (array,) = (tmp_path / "fc" / "features").glob("*.npy")
    _flip_a_data_byte(array)
    verified.clear()
    calls = source.calls
    with pytest.warns(UserWarning, match=_mismatch(array)):
        again = load_or_extract(source, dataset, tmp_path / "fc", progress=False)
    assert source.calls > calls
    assert _bits(again).keys() == _bits(first).keys()
    assert all(torch.equal(_bits(again)[k], _bits(first)[k]) for k in first)


def test_an_entry_is_hashed_once_per_process_and_an_index_without_checksum_is_stale(
    tmp_path, monkeypatch
):
    import datamodules.store as store_module

    hashed = []
    checksum = store_module.file_checksum
    monkeypatch.setattr(store_module, "file_checksum", lambda p: hashed.append(p) or checksum(p))
    store = ArrayStore(tmp_path / "store", version=1)
    store.write_array("k", (4, 3), np.uint8, lambda a: a.__setitem__(slice(None), 7))
    store.commit("k", {})
    assert len(hashed) == 1  # at commit
    for _ in range(3):
        assert (store.load("k", (4, 3)).array == 7).all()
    assert len(hashed) == 1  # the writer already knows the array is sound
    verified.clear()
    store.load("k", (4, 3))
    store.load("k", (4, 3))
    assert len(hashed) == 2  # verified once more, then remembered
    index = json.loads(store.index_path("k").read_text())
    del index["checksum"]  # as the previous version wrote it
    store.index_path("k").write_text(json.dumps(index))
    assert store.load("k", (4, 3)) is None


def test_a_second_cache_of_a_source_leaves_the_first_readable(folder, tmp_path):
    first = _build(folder, tmp_path / "cache", size=16)
    held = first.images  # a memory map, as a running fit holds it
    original = np.array(held)
    stamp = first.path.stat().st_mtime_ns
    second = _build(folder, tmp_path / "cache", size=8)
    assert second.path.parent == first.path.parent and second.path != first.path
    assert np.array_equal(held, original)
    # A DataLoader worker reopens the cache by its path.
    assert np.array_equal(np.load(first.path, mmap_mode="r"), original)
    again = _build(folder, tmp_path / "cache", size=16)
    assert again.path == first.path and first.path.stat().st_mtime_ns == stamp


def test_clean_keeps_what_a_live_process_reads_and_removes_the_rest(folder, tmp_path):
    cache, host = tmp_path / "cache", socket.gethostname()
    live, dead, foreign = (_build(folder, cache, size) for size in (16, 8, 12))
    release_leases()  # as if this process had exited
    ended = subprocess.Popen(["true"])
    ended.wait()
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (live.path.parent / f"{live.path.stem}.lease.{sleeper.pid}@{host}").touch()
        dead_lease = dead.path.parent / f"{dead.path.stem}.lease.{ended.pid}@{host}"
        dead_lease.touch()
        foreign_lease = foreign.path.parent / f"{foreign.path.stem}.lease.1@elsewhere"
        foreign_lease.touch()  # another host: live until FOREIGN_LEASE_DAYS old

        listing = {entry.key: entry for entry in list_caches(cache)}
        assert listing[live.path.stem].used_by == (f"{sleeper.pid}@{host}",)
        assert listing[dead.path.stem].used_by == ()
        assert listing[foreign.path.stem].used_by == ("1@elsewhere",)
        assert all(entry.state == "complete" for entry in listing.values())
        assert listing[dead.path.stem].size > dead.path.stat().st_size
        assert "src: 6 images" in listing[dead.path.stem].description

        # Used a moment ago: kept by --unused-for; only the stale lease goes.
        assert [r.path for r in clean_caches(cache, dry_run=True, unused_for_days=1)] == [
            dead_lease
        ]
        dead_size = dead.path.stat().st_size
        planned = clean_caches(cache, dry_run=True)
        assert dead.path.exists() and dead_lease.exists()
        removed = clean_caches(cache)
        assert removed == planned
        dead_index = dead.path.with_suffix(".json")
        assert [r.path for r in removed] == [dead_index, dead.path, dead_lease]
        assert removed[1].size == dead_size and "not in use" in removed[1].reason
        assert np.array_equal(np.load(live.path), np.asarray(live.images))
        assert foreign.path.exists()

        # The lease of another host expires; this process's own lease is live.
        os.utime(foreign_lease, (time.time() - 8 * 86400,) * 2)
        rebuilt = _build(folder, cache, size=8)
        removed = clean_caches(cache)
        assert {r.path for r in removed} == {
            foreign.path,
            foreign.path.with_suffix(".json"),
            foreign_lease,
        }
        assert rebuilt.path.exists() and live.path.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_clean_removes_older_versions_and_interrupted_builds(folder, tmp_path):
    group = _build(folder, tmp_path / "cache").path.parent
    old = ArrayStore(group, version=1)
    old.write_array("old", (2,), np.uint8, lambda a: None)
    (group / "old.json").write_text(json.dumps({"version": 1}))  # written before checksums
    old.write_array("orphan", (2,), np.uint8, lambda a: None)  # an index never written
    stale = group / ".gone.npy.1234.tmp"  # the previous naming, whose writer is unknown
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    fresh = group / ".young.npy.1234.tmp"  # may still be written: kept for a day
    fresh.write_bytes(b"x")
    release_leases()
    removed = {r.path.name: r.reason for r in clean_caches(tmp_path / "cache")}
    assert removed["old.json"].startswith("older version") and "old.npy" in removed
    assert removed["orphan.npy"].startswith("incomplete: array without index")
    assert "untouched for 2.0 days" in removed[stale.name]
    assert fresh.exists() and fresh.name not in removed


def test_a_killed_feature_extraction_is_redone_and_its_leftovers_cleaned(planted, tmp_path):
    dataset = _train_split(planted, tmp_path / "cache")  # the image cache both processes read
    features = tmp_path / "fc" / "features"
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_EXTRACTION, str(planted), str(tmp_path / "cache")]
        + [str(tmp_path / "fc")],
        env=ENV,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    while not list(features.glob(".*.tmp")) and child.poll() is None:
        assert time.monotonic() < deadline, "the extraction never started"
        time.sleep(0.05)
    time.sleep(0.5)  # a few batches in
    child.send_signal(signal.SIGKILL)
    _, errors = child.communicate()
    assert child.returncode == -signal.SIGKILL, errors.decode()[-3000:]
    (temporary,) = features.glob(".*.tmp")
    assert not list(features.glob("*.json")) and not list(features.glob("*.npy"))

    resumed = load_or_extract(PlantedFeatures(), dataset, tmp_path / "fc", progress=False)
    reference = load_or_extract(PlantedFeatures(), dataset, tmp_path / "ref", progress=False)
    assert all(torch.equal(_bits(resumed)[k], _bits(reference)[k]) for k in reference)

    (lease,) = features.glob(f"*.lease.{child.pid}@*")  # killed: its atexit never ran
    removed = {r.path: r.reason for r in clean_caches(tmp_path / "fc")}
    assert removed == {
        temporary: f"temporary of process {child.pid}, which has ended",
        lease: "lease of a process that has ended",
    }
    assert len(list(features.glob("*.npy"))) == 1  # this process still holds the cache
