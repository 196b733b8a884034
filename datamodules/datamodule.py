"""``PlanktonDataModule``: the one data pipeline every method of the suite reads from."""

from __future__ import annotations

import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSamplerWrapper
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, WeightedRandomSampler

from .cache import CachedImages, default_cache_dir
from .candidates import (
    ScannedSource,
    Split,
    assemble_splits,
    cache_candidates,
    refuse_skipped,
    split_candidates,
    training_classes,
)
from .images import PlanktonImages, device_memory
from .preprocessing import Preprocessing
from .sources import FIXED_SPLITS, SourceFormat, scan
from .summary import DatasetSummary, split_order, summarize
from .synthetic import SyntheticPlankton, ensure_dataset
from .views import View, eval_view


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
        _check_settings(
            regime=regime,
            sampler=sampler,
            resident_fraction=resident_fraction,
            ood_names=list(ood or {}),
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            max_per_class=max_per_class,
            max_class_images=max_class_images,
            min_per_class=min_per_class,
        )
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
        self._splits: dict[str, Split] | None = None
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

    def _scan_sources(self) -> list[ScannedSource]:
        """The main source, then each extra OOD source, scanned."""
        if self.source == "synthetic":
            main_path = ensure_dataset(self.synthetic, self.cache_dir, progress=self.progress)
            main_format: SourceFormat = "manifest"
        else:
            main_path, main_format = Path(self.source).expanduser(), self.format
        main = scan(main_path, main_format, self.train_years, self.test_years)
        extra = [
            ScannedSource(str(Path(path).resolve()), name, scan(path))
            for name, path in sorted(self.ood.items())
        ]
        if not main.records:
            raise ValueError(
                f"no images found in {main_path}: expected class folders (root/<class>/*.png), "
                "WHOI year folders, a CSV manifest or an EcoTaxa TSV"
                + (f"; {len(main.skipped)} files were skipped" if main.skipped else "")
            )
        return [ScannedSource(str(main_path.resolve()), None, main), *extra]

    def _build(self) -> None:
        cached = cache_candidates(
            self._scan_sources(),
            self.preprocessing,
            self.cache_dir,
            self.class_map,
            self.num_workers,
            self.progress,
        )
        if self.strict:
            refuse_skipped(cached.skipped)
        by_split, dropped, capped = split_candidates(
            cached.in_distribution,
            self.min_per_class,
            self.max_class_images,
            self.val_fraction,
            self.test_fraction,
            self.split_seed,
        )
        sets = {**cached.out_of_distribution, **by_split}
        classes = training_classes(sets, self.source, self.min_per_class)
        balanced = self.max_per_class if self.regime == "balanced" else None
        splits, unused, unknown = assemble_splits(sets, classes, balanced, self.split_seed)
        self._summary = summarize(classes, splits, cached, dropped, capped, unused, unknown)
        self._splits = splits
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
                + ", ".join(sorted(splits, key=split_order))
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

    def _splits_or_build(self) -> dict[str, Split]:
        self.summary  # noqa: B018
        assert self._splits is not None
        return self._splits


def _check_settings(
    regime: str,
    sampler: str,
    resident_fraction: float,
    ood_names: list[str],
    batch_size: int,
    eval_batch_size: int | None,
    num_workers: int,
    max_per_class: int,
    max_class_images: int | None,
    min_per_class: int,
) -> None:
    """Raise, naming the option, for a setting the DataModule cannot work with."""
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
    clashes = sorted(set(ood_names) & set(FIXED_SPLITS))
    if clashes:
        raise ValueError(f"ood set names {clashes} clash with train/val/test: rename them")
