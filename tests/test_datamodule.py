import csv
import pickle
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import shared_dataset
from PIL import Image

from datamodules import PlanktonDataModule
from datamodules.sources import scan
from datamodules.views import eval_view
from lightning_modules.baselines.dino import dino_view
from lightning_modules.baselines.simclr import simclr_view
from lightning_modules.baselines.supervised import supervised_view
from lightning_modules.diffusion import diffusion_view


def _write_images(folder, label, n, value=128, size=(12, 16)):
    (folder / label).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash((label, n))) % 2**32)
    for i in range(n):
        image = np.full(size, value, np.uint8)
        image[4:8, 4:10] = rng.integers(0, 255, (4, 6))
        Image.fromarray(image).save(folder / label / f"{label}_{i:03d}.png")


@pytest.fixture
def class_folders(tmp_path):
    root = tmp_path / "images"
    for label, n in {"copepod": 40, "diatom": 20, "rare": 3}.items():
        _write_images(root, label, n)
    return root


def _module(source, tmp_path, **kwargs):
    kwargs.setdefault("image_size", 16)
    return PlanktonDataModule(
        source=str(source), cache_dir=str(tmp_path / "cache"), progress=False, **kwargs
    )


def test_class_folders_give_classes_counts_and_batches(class_folders, tmp_path):
    dm = _module(class_folders, tmp_path, batch_size=8)
    assert dm.class_names == ["copepod", "diatom", "rare"]
    assert dm.num_classes == 3
    counts = dm.summary.counts
    assert (
        sum(counts["train"].values()) + sum(counts["val"].values()) + sum(counts["test"].values())
        == 63
    )
    assert counts["test"]["copepod"] == 8 and counts["val"]["copepod"] == 4
    dm.setup("fit")
    images, labels, index = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 1, 16, 16) and images.dtype == torch.float32
    assert -1 <= images.min() and images.max() <= 1
    assert labels.dtype == torch.long and index.shape == (8,)
    assert torch.equal(dm.class_counts, torch.tensor([28, 14, 1]))
    weights = dm.class_weights
    assert weights.mean().item() == pytest.approx(1.0)
    assert weights[2] > weights[1] > weights[0]


def test_splits_are_disjoint_and_reproducible(class_folders, tmp_path):
    def members(dm):
        return {
            split: {int(r) for r in dm.dataset(split).rows} for split in ("train", "val", "test")
        }

    first, again = (
        members(_module(class_folders, tmp_path)),
        members(_module(class_folders, tmp_path)),
    )
    assert first == again
    assert not (first["train"] & first["val"]) and not (first["train"] & first["test"])
    assert not (first["val"] & first["test"])


def test_balanced_regime_caps_training_images(class_folders, tmp_path):
    dm = _module(class_folders, tmp_path, regime="balanced", max_per_class=5)
    assert dm.summary.counts["train"] == {"copepod": 5, "diatom": 5, "rare": 1}
    assert dm.summary.unused_train == {"copepod": 23, "diatom": 9}
    long_tailed = _module(class_folders, tmp_path)
    assert long_tailed.summary.counts["test"] == dm.summary.counts["test"]


def test_max_class_images_keeps_a_smaller_long_tailed_copy_and_counts_what_it_left(
    class_folders, tmp_path
):
    dm = _module(class_folders, tmp_path, max_class_images=10)
    totals = {c: sum(dm.summary.counts[s][c] for s in ("train", "val", "test"))
              for c in dm.class_names}  # fmt: skip
    assert totals == {"copepod": 10, "diatom": 10, "rare": 3}  # the tail is kept whole
    assert dm.summary.capped == {"copepod": 30, "diatom": 10}
    again = _module(class_folders, tmp_path, max_class_images=10)
    assert set(again.dataset("train").rows) == set(dm.dataset("train").rows)
    with pytest.raises(ValueError, match="max_class_images must be at least 1"):
        _module(class_folders, tmp_path, max_class_images=0)


def test_min_per_class_drops_rare_classes_and_reports_them(class_folders, tmp_path):
    with pytest.warns(UserWarning, match="min_per_class"):
        dm = _module(class_folders, tmp_path, min_per_class=5)
        dm.setup()
    assert dm.class_names == ["copepod", "diatom"]
    assert dm.summary.dropped_classes == {"rare": 3}


def test_class_map_renames_and_drops(class_folders, tmp_path):
    dm = _module(class_folders, tmp_path, class_map={"diatom": "phytoplankton", "rare": None})
    assert dm.class_names == ["copepod", "phytoplankton"]
    assert dm.summary.excluded["unsplit"] == {"rare": 3}


def test_manifest_with_fixed_and_ood_splits(class_folders, tmp_path):
    manifest = tmp_path / "manifest.csv"
    files = sorted(class_folders.rglob("*.png"))
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split", "domain", "station"])
        for i, file in enumerate(files):
            label = file.parent.name
            split = "spring" if i % 5 == 0 else ("test" if i % 5 == 1 else "")
            writer.writerow([file.relative_to(tmp_path).as_posix(), label, split, "x", "st1"])
        _write_images(tmp_path / "extra", "unknown_taxon", 1)
        writer.writerow(
            ["extra/unknown_taxon/unknown_taxon_000.png", "unknown_taxon", "spring", "x", "st1"]
        )
    dm = _module(manifest, tmp_path)
    assert dm.eval_set_names == ["test", "spring"]
    assert dm.summary.excluded["spring"] == {"unknown_taxon": 1}
    n_fixed_test = sum(1 for i in range(len(files)) if i % 5 == 1)
    assert sum(dm.summary.counts["test"].values()) >= n_fixed_test
    assert len(dm.test_dataloader()) == 2


def test_external_ood_set_uses_training_classes(class_folders, tmp_path):
    other_site = tmp_path / "other_site"
    _write_images(other_site, "copepod", 4, value=30)
    _write_images(other_site, "jellyfish", 2, value=30)
    dm = _module(class_folders, tmp_path, ood={"geographic": str(other_site)})
    assert dm.summary.counts["geographic"] == {"copepod": 4, "diatom": 0, "rare": 0}
    assert dm.summary.excluded["geographic"] == {"jellyfish": 2}
    images, labels, _ = next(iter(dm.test_dataloader()[1]))
    assert (labels == 0).all() and len(labels) == 4


def test_whoi_layout_uses_the_last_year_as_test(tmp_path):
    root = tmp_path / "whoi"
    for year in ("2012", "2013", "2014"):
        _write_images(root / year, "Guinardia", 10, value=int(year) % 200)
        _write_images(root / year, "Ditylum", 10, value=int(year) % 200)
    dm = _module(root, tmp_path)
    assert sum(dm.summary.counts["test"].values()) == 20
    assert all(k.startswith("2014/") for k in _keys(dm, "test"))
    assert not any(k.startswith("2014/") for k in _keys(dm, "train") + _keys(dm, "val"))


def _keys(dm, split):
    # The cache's row i holds the i-th record of the source's scan.
    records = scan(dm.source).records
    return [records[r].key for r in dm.dataset(split).rows]


def test_ecotaxa_export(tmp_path):
    _write_images(tmp_path / "imgs", "a", 6)
    _write_images(tmp_path / "imgs", "b", 6)
    rows = ["img_file_name\tobject_annotation_category\tobject_id", "[t]\t[t]\t[t]"]
    for file in sorted((tmp_path / "imgs").rglob("*.png")):
        rows.append(
            f"{file.relative_to(tmp_path).as_posix()}\tCalanoida<Copepoda{file.parent.name}\t1"
        )
    (tmp_path / "export.tsv").write_text("\n".join(rows) + "\n")
    dm = _module(tmp_path / "export.tsv", tmp_path)
    assert dm.class_names == ["Calanoida<Copepodaa", "Calanoida<Copepodab"]


def test_bad_files_are_skipped_and_listed_or_raise_under_strict(class_folders, tmp_path):
    (class_folders / "copepod" / "empty.png").write_bytes(b"")
    (class_folders / "copepod" / "notes.txt").write_text("field notes")
    good = (class_folders / "diatom" / "diatom_000.png").read_bytes()
    (class_folders / "diatom" / "truncated.png").write_bytes(good[: len(good) // 2])
    (class_folders / "empty_class").mkdir()
    with pytest.warns(UserWarning, match="3 file"):
        dm = _module(class_folders, tmp_path)
        dm.setup()
    reasons = {s.path.rsplit("/", 1)[1]: s.reason for s in dm.summary.skipped}
    assert set(reasons) == {"empty.png", "notes.txt", "truncated.png"}
    assert "empty" in reasons["empty.png"] and "not an image" in reasons["notes.txt"]
    assert any("empty class folder" in w for w in dm.summary.warnings)
    assert "empty_class" not in dm.class_names
    assert sum(sum(c.values()) for c in dm.summary.counts.values()) == 63
    with pytest.raises(ValueError, match="strict: 3 file"):
        _module(class_folders, tmp_path, strict=True).summary  # noqa: B018


def test_missing_or_empty_source_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _module(tmp_path / "nowhere", tmp_path).summary  # noqa: B018
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found in .*empty"):
        _module(tmp_path / "empty", tmp_path).summary  # noqa: B018


def test_ood_names_must_not_clash(tmp_path):
    with pytest.raises(ValueError, match="clash"):
        PlanktonDataModule(ood={"test": "x"})


def test_synthetic_default_reads_its_shifted_sets(tiny_spec, tmp_path):
    dm = PlanktonDataModule(synthetic=tiny_spec, image_size=16, progress=False)
    assert dm.eval_set_names == ["test", "geographic", "temporal"]
    assert dm.num_classes == tiny_spec.classes
    assert sum(dm.summary.counts["geographic"].values()) > 0


def test_class_balanced_sampler_draws_classes_evenly(class_folders, tmp_path):
    dm = _module(class_folders, tmp_path, sampler="class_balanced", batch_size=2000)
    dm.trainer = None
    torch.manual_seed(0)
    loader = dm.train_dataloader()
    drawn = Counter()
    for _ in range(20):
        for _, labels, _ in loader:
            drawn.update(labels.tolist())
    shares = np.array([drawn[i] for i in range(3)]) / sum(drawn.values())
    assert np.allclose(shares, 1 / 3, atol=0.05)


def test_train_view_comes_from_the_model(class_folders, tmp_path):
    class WithView:
        def train_view(self, image_size, channels):
            return lambda images: torch.zeros(len(images), channels, image_size, image_size) + 7

    class FakeTrainer:
        lightning_module = WithView()
        strategy = SimpleNamespace(root_device=torch.device("cpu"))
        world_size = 1

    dm = _module(class_folders, tmp_path, batch_size=4)
    dm.trainer = FakeTrainer()
    images, _, _ = next(iter(dm.train_dataloader()))
    assert (images == 7).all()
    val_images, _, _ = next(iter(dm.val_dataloader()))
    assert not (val_images == 7).any()


@pytest.mark.parametrize("view", [eval_view, diffusion_view, supervised_view])
def test_tensor_views_keep_shape_and_range(view):
    image = torch.randint(0, 256, (1, 16, 16), dtype=torch.uint8)
    out = view(16, 1)(image)
    assert out.shape == (1, 16, 16) and -1 <= out.min() and out.max() <= 1


def test_eval_view_is_deterministic_and_diffusion_view_keeps_pixels():
    image = torch.randint(0, 256, (1, 16, 16), dtype=torch.uint8)
    assert torch.equal(eval_view(16, 1)(image), eval_view(16, 1)(image))
    scaled = eval_view(16, 1)(image)
    augmented = diffusion_view(16, 1)(image)
    assert torch.equal(augmented.flatten().sort().values, scaled.flatten().sort().values)


@pytest.mark.parametrize("channels", [1, 3])
def test_lightly_views_are_greyscale_aware(channels):
    image = torch.randint(0, 256, (channels, 16, 16), dtype=torch.uint8)
    simclr = simclr_view(16, channels)(image)
    assert len(simclr) == 2 and all(v.shape == (channels, 16, 16) for v in simclr)
    dino = dino_view(16, channels, n_local_views=2)(image)
    assert [v.shape[-1] for v in dino] == [16, 16, 8, 8]
    assert all(v.shape[0] == channels for v in dino)


def test_datasets_pickle_without_their_memory_map(class_folders, tmp_path):
    dataset = _module(class_folders, tmp_path).dataset("train")
    dataset[0]
    clone = pickle.loads(pickle.dumps(dataset))
    assert clone._images is None
    assert torch.equal(clone[3][0], dataset[3][0])


def test_loader_workers_give_the_same_images(class_folders, tmp_path):
    def batches(workers):
        dm = _module(class_folders, tmp_path, num_workers=workers, batch_size=16)
        return [b[0] for b in dm.val_dataloader()] + [b[0] for b in dm.test_dataloader()[0]]

    assert all(torch.equal(a, b) for a, b in zip(batches(0), batches(2), strict=True))


@pytest.mark.shared_data
def test_real_uvp6_images(tmp_path):
    root = shared_dataset("uvp6")
    dm = PlanktonDataModule(
        source=str(root), image_size=32, polarity="auto", cache_dir=str(tmp_path), progress=False
    )
    assert dm.num_classes == 10 and "detritus" in dm.class_names
    assert (
        sum(sum(c.values()) for c in dm.summary.counts.values()) == 1150
    )  # 9 classes of 100, 250 detritus
    image = dm.dataset("test")[0][0]
    border = torch.cat([image[0, 0], image[0, -1], image[0, :, 0], image[0, :, -1]])
    assert border.median() < 0  # bright objects on a dark background


@pytest.mark.shared_data
def test_real_isiis_images_are_inverted_by_auto_polarity(tmp_path):
    root = shared_dataset("ndsb_isiis")
    manifest = tmp_path / "subset.csv"
    classes = sorted(p for p in root.iterdir() if p.is_dir())[:3]
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        for folder in classes:
            for file in sorted(folder.glob("*.png"))[:20]:
                writer.writerow([str(file), folder.name])
    for polarity, dark_background in (("keep", False), ("auto", True)):
        dm = PlanktonDataModule(
            source=str(manifest),
            image_size=32,
            polarity=polarity,
            cache_dir=str(tmp_path),
            progress=False,
        )
        image = dm.dataset("train")[0][0]
        assert (image[0, 0].median() < 0) == dark_background
