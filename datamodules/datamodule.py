"""``PlanktonDataModule``: the one data pipeline every method of the suite reads from."""

from __future__ import annotations

import os
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from .cache import CachedImages, default_cache_dir, load_or_build
from .preprocessing import Preprocessing
from .sources import FIXED_SPLITS, TRAINVAL, ImageRecord, Skipped, SourceFormat, scan
from .splits import assign_splits, balanced_subset
from .synthetic import SyntheticPlankton, ensure_dataset
from .views import View, eval_view

IN_DISTRIBUTION = (*FIXED_SPLITS, TRAINVAL, None)


class PlanktonImages(Dataset):
    """Images of one split, read from the cache a whole batch at a time.

    Items are ``(image, label, index)``; ``index`` is the image's position in this split, a
    stable identity for per-image randomness. A DataLoader's batch is read with one access to the
    cache and transformed with one call of the (batched) view, on the device the images are on:
    ``__getitems__`` returns the collated batch ``(images, labels, indices)``, so read it through
    ``loader`` (or a DataLoader with ``collate_fn=keep_batch``).

    Args:
        images: the dataset's cache file (read memory-mapped, opened once per worker), or the
            split's images already in memory, ``(len(rows), C, S, S)`` uint8 on any device: then
            batches are drawn and augmented on that device, without workers.
        rows: each image's row in the cache file.
        labels: each image's class index.
        transform: the batched view applied to every batch.
    """

    def __init__(
        self,
        images: Path | torch.Tensor,
        rows: np.ndarray,
        labels: np.ndarray,
        transform: View,
    ) -> None:
        self.rows = rows
        self.labels = labels
        self.transform = transform
        self.resident = isinstance(images, torch.Tensor)
        self.cache_path = None if self.resident else images
        self._images = images if self.resident else None
        self._labels = torch.as_tensor(labels, device=images.device) if self.resident else None

    def __len__(self) -> int:
        return len(self.rows)

    def _read(self, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.resident:
            at = torch.as_tensor(positions, device=self._images.device)
            return self._images[at], self._labels[at], at
        if self._images is None:  # opened lazily, once per DataLoader worker
            self._images = np.load(self.cache_path, mmap_mode="r")
        images = torch.from_numpy(np.array(self._images[self.rows[positions]]))
        return images, torch.as_tensor(self.labels[positions]), torch.as_tensor(positions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | list[torch.Tensor], int, int]:
        images, _, _ = self._read([index])
        views = self.transform(images)
        image = [view[0] for view in views] if isinstance(views, list) else views[0]
        return image, int(self.labels[index]), index

    def __getitems__(self, positions: list[int]) -> tuple:
        images, labels, positions = self._read(positions)
        return self.transform(images), labels, positions

    def loader(self, batch_size: int, **options: object) -> DataLoader:
        """A DataLoader of whole batches; ``options`` are DataLoader arguments."""
        return DataLoader(self, batch_size=batch_size, collate_fn=keep_batch, **options)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_images": self._images if self.resident else None}


def keep_batch(batch: tuple) -> tuple:
    """The collate function of ``PlanktonImages``: its batches come collated already."""
    return batch


def device_memory(device: torch.device) -> int:
    """Bytes of memory of ``device``: the GPU's, or the machine's RAM for a CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class DatasetSummary:
    """What the DataModule made of a dataset: the answer of ``plankton data inspect``."""

    classes: list[str]
    counts: dict[str, dict[str, int]]
    skipped: list[Skipped]
    dropped_classes: dict[str, int] = field(default_factory=dict)
    excluded: dict[str, dict[str, int]] = field(default_factory=dict)
    unused_train: dict[str, int] = field(default_factory=dict)
    capped: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "classes": self.classes,
            "counts": self.counts,
            "skipped": [s.as_dict() for s in self.skipped],
            "dropped_classes": self.dropped_classes,
            "excluded": self.excluded,
            "unused_train": self.unused_train,
            "capped": self.capped,
            "warnings": self.warnings,
        }


def _at_most_per_class(
    items: list, keys: list[str], labels: list[str], per_class: int, seed: int
) -> tuple[list, Counter]:
    """``items`` cut to at most ``per_class`` of each label (``balanced_subset``: the same ones
    on every run), and the count left out per label."""
    keep = set(balanced_subset(range(len(items)), keys, labels, per_class, seed))
    left_out = Counter(label for i, label in enumerate(labels) if i not in keep)
    return [item for i, item in enumerate(items) if i in keep], left_out


@dataclass
class _Split:
    source: CachedImages
    rows: list[int]
    labels: list[str]


class PlanktonDataModule(L.LightningDataModule):
    """Plankton images from class folders, WHOI year folders, a CSV manifest, an EcoTaxa export
    or the synthetic generator, preprocessed once into a cache and split deterministically.

    Args:
        source: ``synthetic`` (the default, generated on first use) or the path of a folder of
            class folders, a WHOI-style folder of years, a CSV manifest or an EcoTaxa TSV.
        format: layout of ``source``; ``auto`` guesses it from the path.
        synthetic: settings of the synthetic dataset when ``source`` is ``synthetic``.
        train_years: WHOI layout: years whose images are split into train and val.
            Default: every year but the last.
        test_years: WHOI layout: years that form the test set. Default: the last year.
        ood: named out-of-distribution test sets, ``{name: path}``, read like ``source`` and
            evaluated with the training classes. Manifest rows whose ``split`` is not train, val
            or test add sets too.
        class_map: ``{label: new_label}`` to rename, ``{label: null}`` to drop, applied to every
            set before anything else.
        regime: ``long_tailed`` trains on every training image, ``balanced`` on at most
            ``max_per_class`` per class (the same images on every run).
        max_per_class: training images per class in the balanced regime.
        max_class_images: at most this many images of each class are used, in every split and
            regime (before splitting; the same images on every run): a smaller copy of a large
            dataset that keeps its long tail, for a run on a CPU. The images left out are counted
            per class (``plankton data inspect``). None uses them all.
        min_per_class: classes with fewer images (before splitting) are dropped and reported.
        val_fraction: fraction of each class's images for validation.
        test_fraction: fraction of each class's images for test.
        split_seed: seed of the split hash; change it for another random split.
        image_size: side of the square images the models see.
        channels: 1 for greyscale (the default), 3 for RGB.
        polarity: ``auto`` (the default, as in every config) inverts dark-on-light images so
            every instrument gives bright objects on a dark background; ``keep`` leaves them.
        max_aspect: longest aspect ratio kept before padding; thinner objects are widened.
        max_image_pixels: images with more pixels are skipped and listed, not decoded (a
            "decompression bomb" cannot stop the dataset); PIL's own limit by default.
        strict: raise on any unreadable or non-image file instead of skipping and listing it.
        cache_dir: where synthetic data and preprocessed caches live
            (default ``$PLANKTON_CACHE`` or ``~/.cache/plankton``).
        batch_size: training batch size per device.
        eval_batch_size: batch size of validation, test and predict (default: ``batch_size``).
        num_workers: DataLoader workers, also used to build the cache.
        sampler: ``shuffle``, or ``class_balanced`` to draw every class equally often.
        predict_set: the split ``predict`` runs on (``test``, ``val``, ``train`` or an OOD name).
        resident_fraction: a split whose uint8 images fit, with the splits already there, in
            this fraction of the training device's memory (the GPU's; the RAM for a CPU) is
            copied to the device once; its batches are then drawn and augmented there, with no
            worker process. 0 reads every batch from the disk cache (with ``num_workers``).
        progress: show progress bars for generation and caching.
    """

    def __init__(
        self,
        source: str = "synthetic",
        format: SourceFormat = "auto",
        synthetic: SyntheticPlankton | None = None,
        train_years: list[str] | None = None,
        test_years: list[str] | None = None,
        ood: dict[str, str] | None = None,
        class_map: dict[str, str | None] | None = None,
        regime: Literal["balanced", "long_tailed"] = "long_tailed",
        max_per_class: int = 100,
        max_class_images: int | None = None,
        min_per_class: int = 1,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        image_size: int = 32,
        channels: Literal[1, 3] = 1,
        polarity: Literal["keep", "auto"] = "auto",
        max_aspect: float = 4.0,
        max_image_pixels: int = Preprocessing.max_pixels,
        strict: bool = False,
        cache_dir: str | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        sampler: Literal["shuffle", "class_balanced"] = "shuffle",
        predict_set: str = "test",
        resident_fraction: float = 0.25,
        progress: bool = True,
    ) -> None:
        super().__init__()
        if regime not in ("balanced", "long_tailed"):
            raise ValueError(f"regime must be 'balanced' or 'long_tailed', got {regime!r}")
        if sampler not in ("shuffle", "class_balanced"):
            raise ValueError(f"sampler must be 'shuffle' or 'class_balanced', got {sampler!r}")
        for name, value, least in (
            ("batch_size", batch_size, 1),
            ("eval_batch_size", 1 if eval_batch_size is None else eval_batch_size, 1),
            ("num_workers", num_workers, 0),
            ("max_per_class", max_per_class, 1),
            ("max_class_images", 1 if max_class_images is None else max_class_images, 1),
            ("min_per_class", min_per_class, 0),
        ):
            if value < least:
                raise ValueError(f"{name} must be at least {least}, got {value}")
        if not 0 <= resident_fraction <= 1:
            raise ValueError(
                f"resident_fraction must be between 0 (always read from the disk cache) and 1, "
                f"got {resident_fraction}"
            )
        clashes = sorted(set(ood or {}) & set(FIXED_SPLITS))
        if clashes:
            raise ValueError(f"ood set names {clashes} clash with train/val/test: rename them")
        self.synthetic = synthetic or SyntheticPlankton()
        # Plain values only, so checkpoints load with ``weights_only=True``.
        self.save_hyperparameters(ignore=["synthetic"])
        self.hparams["synthetic"] = asdict(self.synthetic)
        self.source = source
        self.format = format
        self.train_years, self.test_years = train_years, test_years
        self.ood = dict(ood or {})
        self.class_map = dict(class_map or {})
        self.regime = regime
        self.max_per_class = max_per_class
        self.max_class_images = max_class_images
        self.min_per_class = min_per_class
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.split_seed = split_seed
        self.preprocessing = Preprocessing(
            image_size, channels, polarity, max_aspect, max_image_pixels
        )
        self.strict = strict
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.sampler = sampler
        self.predict_set = predict_set
        self.progress = progress
        self.resident_fraction = resident_fraction
        self._on_device: dict[tuple[str, str], torch.Tensor] = {}
        self._streamed: set[tuple[str, str]] = set()
        self._splits: dict[str, _Split] | None = None
        self._summary: DatasetSummary | None = None

    # -- what the models need to know -------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.preprocessing.image_size

    @property
    def channels(self) -> int:
        return self.preprocessing.channels

    @property
    def summary(self) -> DatasetSummary:
        """Classes, counts and everything skipped; scanning and caching happen on first use."""
        if self._summary is None:
            self._build()
        assert self._summary is not None
        return self._summary

    @property
    def class_names(self) -> list[str]:
        return self.summary.classes

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def eval_set_names(self) -> list[str]:
        """The test split first, then every out-of-distribution set, in test dataloader order;
        a set without images is left out (scoring it would report 0 accuracy)."""
        counts = self.summary.counts
        names = ["test"] + sorted(s for s in counts if s not in FIXED_SPLITS)
        return [name for name in names if sum(counts[name].values())]

    @property
    def class_counts(self) -> torch.Tensor:
        """Training images per class, in ``class_names`` order."""
        train = self.summary.counts["train"]
        return torch.tensor([train[c] for c in self.class_names], dtype=torch.long)

    @property
    def class_weights(self) -> torch.Tensor:
        """Inverse-frequency weights with mean 1 over classes, for a class-balanced loss."""
        inverse = 1.0 / self.class_counts.double().clamp(min=1)
        return (inverse / inverse.mean()).float()

    # -- building ----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.summary  # noqa: B018 - generates, scans and caches once per node

    def setup(self, stage: str | None = None) -> None:
        self.summary  # noqa: B018

    def _scan_sources(
        self,
    ) -> list[tuple[str, str | None, list[ImageRecord], list[Skipped], list[str]]]:
        """``(name, ood set or None, records, skipped, warnings)`` of the main source and each
        extra OOD source."""
        if self.source == "synthetic":
            main_path = ensure_dataset(self.synthetic, self.cache_dir, progress=self.progress)
            main_format: SourceFormat = "manifest"
        else:
            main_path, main_format = Path(self.source).expanduser(), self.format
        sources = []
        main = scan(main_path, main_format, self.train_years, self.test_years)
        sources.append((str(main_path.resolve()), None, main.records, main.skipped, main.warnings))
        for name, path in sorted(self.ood.items()):
            part = scan(path)
            sources.append(
                (str(Path(path).resolve()), name, part.records, part.skipped, part.warnings)
            )
        if not main.records:
            raise ValueError(
                f"no images found in {main_path}: expected class folders (root/<class>/*.png), "
                "WHOI year folders, a CSV manifest or an EcoTaxa TSV"
                + (f"; {len(main.skipped)} files were skipped" if main.skipped else "")
            )
        return sources

    def _build(self) -> None:
        skipped: list[Skipped] = []
        notes: list[str] = []
        excluded: dict[str, Counter] = defaultdict(Counter)
        candidates: dict[str, list[tuple[CachedImages, int, str, str]]] = defaultdict(list)
        in_distribution: list[tuple[CachedImages, int, ImageRecord, str]] = []
        for name, ood_name, records, scan_skipped, scan_notes in self._scan_sources():
            skipped += scan_skipped
            notes += scan_notes
            cached = load_or_build(
                records, self.preprocessing, self.cache_dir, name, self.num_workers, self.progress
            )
            skipped += cached.failed
            for row, record in enumerate(records):
                if not cached.readable[row]:
                    continue
                label = self.class_map.get(record.label, record.label)
                set_name = ood_name or record.split
                if label is None:
                    excluded[set_name or "unsplit"][record.label] += 1
                elif set_name in IN_DISTRIBUTION:
                    in_distribution.append((cached, row, record, label))
                else:
                    candidates[set_name].append((cached, row, label, record.key))
        if self.strict and skipped:
            listing = "\n".join(f"  {s.path}: {s.reason}" for s in skipped[:50])
            more = f"\n  ... and {len(skipped) - 50} more" if len(skipped) > 50 else ""
            raise ValueError(
                f"strict: {len(skipped)} file(s) cannot be used:\n{listing}{more}\n"
                "Remove or fix them, or set strict: false to skip and list them."
            )

        sizes = Counter(label for _, _, _, label in in_distribution)
        dropped = {c: n for c, n in sorted(sizes.items()) if n < self.min_per_class}
        in_distribution = [item for item in in_distribution if item[3] not in dropped]
        capped: Counter = Counter()
        if self.max_class_images is not None:
            in_distribution, capped = _at_most_per_class(
                in_distribution,
                [record.key for _, _, record, _ in in_distribution],
                [label for _, _, _, label in in_distribution],
                self.max_class_images,
                self.split_seed,
            )
        splits = assign_splits(
            [record.key for _, _, record, _ in in_distribution],
            [label for _, _, _, label in in_distribution],
            [record.split for _, _, record, _ in in_distribution],
            self.val_fraction,
            self.test_fraction,
            self.split_seed,
        )
        for (cached, row, record, label), split in zip(in_distribution, splits, strict=True):
            candidates[split].append((cached, row, label, record.key))

        classes = sorted({label for _, _, label, _ in candidates.get("train", [])})
        if not classes:
            raise ValueError(
                f"no training images left in {self.source} after skipping unreadable files, "
                f"class_map and min_per_class={self.min_per_class}: check the data settings"
            )
        if len(classes) == 1:
            raise ValueError(
                f"only one class ({classes[0]!r}) in {self.source}: classifiers and probes need "
                "two or more. Give data.source the folder whose subfolders are the classes, or "
                "check class_map and min_per_class"
            )
        known = set(classes)
        chosen: dict[str, _Split] = {}
        unused: Counter = Counter()
        for set_name, items in candidates.items():
            kept = [item for item in items if item[2] in known]
            for item in items:
                if item[2] not in known:
                    excluded[set_name][item[2]] += 1
            if set_name == "train" and self.regime == "balanced":
                kept, unused = _at_most_per_class(
                    kept,
                    [item[3] for item in kept],
                    [item[2] for item in kept],
                    self.max_per_class,
                    self.split_seed,
                )
            sources = {id(item[0]) for item in kept}
            assert len(sources) <= 1, f"set {set_name} spans several caches"
            chosen[set_name] = _Split(
                source=kept[0][0] if kept else items[0][0],
                rows=[item[1] for item in kept],
                labels=[item[2] for item in kept],
            )
        for split in FIXED_SPLITS:
            chosen.setdefault(split, _Split(in_distribution[0][0], [], []))

        counts = {
            name: {c: Counter(split.labels)[c] for c in classes} for name, split in chosen.items()
        }
        self._summary = DatasetSummary(
            classes=classes,
            counts=dict(sorted(counts.items(), key=lambda kv: _split_order(kv[0]))),
            skipped=skipped,
            dropped_classes=dropped,
            excluded={k: dict(sorted(v.items())) for k, v in sorted(excluded.items())},
            unused_train=dict(sorted(unused.items())),
            capped=dict(sorted(capped.items())),
            warnings=notes,
        )
        self._splits = chosen
        self._report()

    def _report(self) -> None:
        summary = self.summary
        if summary.skipped:
            examples = "; ".join(f"{s.path} ({s.reason})" for s in summary.skipped[:3])
            warnings.warn(
                f"{len(summary.skipped)} file(s) skipped, e.g. {examples}. "
                "`plankton data inspect` lists them all.",
                stacklevel=3,
            )
        if summary.dropped_classes:
            warnings.warn(
                f"classes with fewer than min_per_class={self.min_per_class} images dropped: "
                f"{summary.dropped_classes}",
                stacklevel=3,
            )
        for note in summary.warnings:
            warnings.warn(note, stacklevel=3)
        evaluated = ["train", "val", *self.eval_set_names]
        left_out = [name for name in summary.counts if name not in evaluated]
        if left_out:
            rank_zero_info(
                f"left out of testing, having no images of the training classes: "
                f"{', '.join(left_out)} (plankton data inspect gives every set's counts)"
            )

    # -- datasets and loaders ----------------------------------------------------------------
    def dataset(
        self, split: str, transform: View | None = None, device: torch.device | None = None
    ) -> PlanktonImages:
        """The images of ``split`` (train, val, test or an OOD set name), evaluation view by
        default. With ``device``, the split's images are held there when they fit in
        ``resident_fraction`` of its memory (see the class docstring)."""
        splits = self._splits_or_build()
        if split not in splits:
            raise ValueError(
                f"no split {split!r} in {self.source}: choose among "
                + ", ".join(sorted(splits, key=_split_order))
            )
        part = splits[split]
        index = {c: i for i, c in enumerate(self.class_names)}
        rows = np.asarray(part.rows, dtype=np.int64)
        resident = self._resident(split, rows, part.source, device) if device else None
        return PlanktonImages(
            part.source.path if resident is None else resident,
            rows,
            np.asarray([index[label] for label in part.labels], dtype=np.int64),
            transform or eval_view(self.image_size, self.channels),
        )

    def _resident(
        self, split: str, rows: np.ndarray, source: CachedImages, device: torch.device
    ) -> torch.Tensor | None:
        """The split's uint8 images on ``device``, copied there once, or None when they would
        take the device past ``resident_fraction`` of its memory."""
        key = (split, str(device))
        if key not in self._on_device:
            size = len(rows) * int(np.prod(source.images.shape[1:]))
            held = sum(t.nbytes for (_, d), t in self._on_device.items() if d == str(device))
            budget = self.resident_fraction * device_memory(device)
            if held + size > budget:
                if key not in self._streamed:
                    self._streamed.add(key)
                    rank_zero_info(
                        f"{split}: {len(rows)} images ({size / 2**20:.1f} MiB) streamed from the "
                        f"disk cache: with {held / 2**20:.1f} MiB already on {device} they exceed "
                        f"resident_fraction={self.resident_fraction} of its memory"
                    )
                return None
            self._on_device[key] = torch.from_numpy(np.array(source.images[rows])).to(device)
            rank_zero_info(f"{split}: {len(rows)} images ({size / 2**20:.1f} MiB) held on {device}")
        return self._on_device[key]

    def _model_hook(self, name: str) -> object:
        """An optional attribute of the attached model: how it wants its data."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        return getattr(module, name, None)

    def _device(self) -> torch.device | None:
        return self.trainer.strategy.root_device if self.trainer is not None else None

    def _loader(
        self,
        split: str,
        view: View | None = None,
        train: bool = False,
        positions: list[int] | None = None,
    ) -> DataLoader:
        device = self._device()
        dataset = self.dataset(split, view, device)
        sampler = positions
        if train and self.sampler == "class_balanced":
            per_class = np.bincount(dataset.labels, minlength=self.num_classes).clip(min=1)
            weights = torch.as_tensor(1.0 / per_class[dataset.labels], dtype=torch.double)
            sampler = WeightedRandomSampler(weights, num_samples=len(dataset), replacement=True)
        world = self.trainer.world_size if self.trainer is not None else 1
        if not train and 1 < world <= len(sampler or dataset):
            # Each image evaluated once under DDP: Lightning's own sampler repeats a few to even
            # out the ranks' batches, and would count them twice in the metrics. Safe while every
            # rank has a batch (Lightning's note on this sampler).
            sampler = UnrepeatedDistributedSamplerWrapper(
                sampler or range(len(dataset)), world, self.trainer.global_rank, shuffle=False
            )
        # Resident images are read and augmented on their device: workers would only copy them.
        workers = 0 if dataset.resident else self.num_workers
        return dataset.loader(
            self.batch_size if train else self.eval_batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=not dataset.resident and device is not None and device.type == "cuda",
            drop_last=train and len(dataset) > self.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        """Training batches in the view the attached model asks for (its ``train_view``
        method); the evaluation view when it has none or returns none."""
        make_view = self._model_hook("train_view")
        view = make_view(self.image_size, self.channels) if make_view is not None else None
        return self._loader("train", view, train=True)

    def val_dataloader(self) -> DataLoader:
        """The validation split, or the fixed subset of ``val_images`` of them (spread evenly
        over the split) that the attached model asks for, so validation stays cheap."""
        size = len(self._splits_or_build()["val"].rows)
        wanted = self._model_hook("val_images")
        positions = None
        if wanted and wanted < size:
            positions = np.linspace(0, size - 1, wanted).round().astype(int).tolist()
        return self._loader("val", positions=positions)

    def test_dataloader(self) -> list[DataLoader]:
        """The test split, then every OOD set (``eval_set_names`` gives their names)."""
        return [self._loader(name) for name in self.eval_set_names]

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set)

    def _splits_or_build(self) -> dict[str, _Split]:
        self.summary  # noqa: B018
        assert self._splits is not None
        return self._splits


def _split_order(name: str) -> tuple[int, str]:
    return (FIXED_SPLITS.index(name), "") if name in FIXED_SPLITS else (len(FIXED_SPLITS), name)
