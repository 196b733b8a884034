import json
import os

import numpy as np
import pytest
from conftest import write_class_folders
from PIL import Image

from datamodules.cache import cache_key, load_or_build
from datamodules.preprocessing import Preprocessing, load_preprocessed
from datamodules.sources import scan
from datamodules.store import ArrayStore


@pytest.fixture
def folder(tmp_path):
    root = write_class_folders(tmp_path / "images", per_class=5)
    (root / "diatom" / "broken.png").write_bytes(b"")
    return root


def _build(folder, cache_dir, settings=None):
    records = scan(folder).records
    settings = settings or Preprocessing(image_size=16)
    return records, load_or_build(records, settings, cache_dir, str(folder), progress=False)


def test_cache_holds_the_preprocessed_images_and_lists_failures(folder, tmp_path):
    records, cached = _build(folder, tmp_path / "cache")
    settings = Preprocessing(image_size=16)
    for i, record in enumerate(records):
        if cached.readable[i]:
            assert np.array_equal(cached.images[i], load_preprocessed(record.path, settings))
    assert [s.path for s in cached.failed] == [str(folder / "diatom" / "broken.png")]
    assert "empty" in cached.failed[0].reason


def test_cache_is_reused(folder, tmp_path):
    _, first = _build(folder, tmp_path / "cache")
    stamp = first.path.stat().st_mtime_ns
    _, second = _build(folder, tmp_path / "cache")
    assert second.path == first.path and second.path.stat().st_mtime_ns == stamp


def test_changed_file_or_setting_invalidates_the_cache(folder, tmp_path):
    records, first = _build(folder, tmp_path / "cache")
    _, resized = _build(folder, tmp_path / "cache", Preprocessing(image_size=8))
    assert resized.path != first.path and resized.images.shape[-1] == 8
    target = folder / "copepod" / "0.png"
    Image.fromarray(np.full((20, 30), 200, np.uint8)).save(target)
    os.utime(target, ns=(1, 1))
    assert cache_key(records, Preprocessing(image_size=16)) != first.path.stem
    _, rebuilt = _build(folder, tmp_path / "cache")
    row = [r.path for r in records].index(target)
    assert (rebuilt.images[row] == 200).all()
    # The stale cache stays (a running fit may read it): `plankton cache clean` removes it.
    assert first.path.exists()


def test_half_written_cache_is_never_read(folder, tmp_path):
    records, cached = _build(folder, tmp_path / "cache")
    index = cached.path.with_suffix(".json")
    index.unlink()  # as if the process died between writing the array and its index
    cached.path.write_bytes(cached.path.read_bytes()[:100])
    _, rebuilt = _build(folder, tmp_path / "cache")
    assert rebuilt.images.shape[0] == len(records)
    assert index.exists()


def test_crash_during_build_leaves_no_cache(folder, tmp_path, monkeypatch):
    import datamodules.cache as cache_module

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "_fill", crash)
    with pytest.raises(KeyboardInterrupt):
        _build(folder, tmp_path / "cache")
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    leftovers = [p for p in files if ".lease." not in p.name]  # this process's lease, until exit
    assert leftovers == []


def test_a_disk_too_small_for_the_image_cache_is_a_clear_error(folder, tmp_path, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10, 10, 100))
    with pytest.raises(OSError, match="needs .* GiB but only .* GiB are free"):
        _build(folder, tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.npy"))


def test_the_index_lists_the_failed_files_only(folder, tmp_path):
    # A list of every file would make the index, and the memory of every load, grow with the set.
    _, cached = _build(folder, tmp_path / "cache")
    index = json.loads(cached.path.with_suffix(".json").read_text())
    assert "files" not in index
    assert [path for _, path, _ in index["failed"]] == [str(folder / "diatom" / "broken.png")]


def test_parallel_build_equals_serial_build(folder, tmp_path):
    records = scan(folder).records
    settings = Preprocessing(image_size=16)
    serial = load_or_build(records, settings, tmp_path / "a", "x", num_workers=0, progress=False)
    parallel = load_or_build(records, settings, tmp_path / "b", "x", num_workers=2, progress=False)
    assert np.array_equal(np.asarray(serial.images), np.asarray(parallel.images))
    assert [s.path for s in serial.failed] == [s.path for s in parallel.failed]


def test_array_store_reads_only_committed_entries_of_its_version_and_shape(tmp_path):
    store = ArrayStore(tmp_path / "store", version=2)
    store.write_array("k", (3, 2), np.float16, lambda a: a.__setitem__(slice(None), 1.5))
    assert store.load("k", (3, 2)) is None  # the array without its index: not complete
    store.commit("k", {"note": "x"})
    stored = store.load("k", (3, 2))
    assert stored.index == {"version": 2, "note": "x", "checksum": stored.index["checksum"]}
    assert (stored.array == 1.5).all()
    assert store.load("k", (2, 3)) is None
    assert ArrayStore(store.folder, version=3).load("k", (3, 2)) is None
