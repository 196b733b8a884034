"""The images a DataModule may use, as named records, and the splits made of them, in three
phases: scan and cache (``cache_candidates``), filter and split (``split_candidates``),
assemble (``assemble_splits``)."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .cache import CachedImages, load_or_build
from .preprocessing import Preprocessing
from .sources import FIXED_SPLITS, TRAINVAL, Scan, Skipped
from .splits import assign_splits, balanced_subset

# The sets of the main source that are split (or kept) into train, val and test; every other
# set name is an out-of-distribution test set.
IN_DISTRIBUTION = (*FIXED_SPLITS, TRAINVAL, None)


class ScannedSource(NamedTuple):
    """One scanned source: the main one (``ood_set`` None) or an extra OOD set."""

    name: str  # the source's resolved path, which names its cache
    ood_set: str | None
    scan: Scan


class Candidate(NamedTuple):
    """One readable image and the set it may go to."""

    cache: CachedImages  # the preprocessed images of its source
    row: int  # its row there
    key: str  # its stable identity, which split hashes and subsets read
    label: str  # its class, after class_map
    set_name: str | None  # its OOD set, its given split (or trainval), or None to be split


@dataclass
class Cached:
    """Every candidate of the sources, and what was left out on the way."""

    in_distribution: list[Candidate] = field(default_factory=list)
    out_of_distribution: dict[str, list[Candidate]] = field(
        default_factory=lambda: defaultdict(list)
    )
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Images per set and original label that class_map drops.
    excluded: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))


@dataclass
class Split:
    """The images of one split: their rows in one cache file and their labels."""

    source: CachedImages
    rows: list[int]
    labels: list[str]


def cache_candidates(
    sources: list[ScannedSource],
    preprocessing: Preprocessing,
    cache_dir: Path,
    class_map: dict[str, str | None],
    num_workers: int,
    progress: bool,
) -> Cached:
    """Phase 1: every source preprocessed into its cache, and each readable image a candidate
    under its ``class_map`` label."""
    cached = Cached()
    for name, ood_set, scan in sources:
        cached.skipped += scan.skipped
        cached.notes += scan.warnings
        images = load_or_build(scan.records, preprocessing, cache_dir, name, num_workers, progress)
        cached.skipped += images.failed
        for row, record in enumerate(scan.records):
            if not images.readable[row]:
                continue
            label = class_map.get(record.label, record.label)
            set_name = ood_set or record.split
            if label is None:
                cached.excluded[set_name or "unsplit"][record.label] += 1
                continue
            candidate = Candidate(images, row, record.key, label, set_name)
            if set_name in IN_DISTRIBUTION:
                cached.in_distribution.append(candidate)
            else:
                cached.out_of_distribution[set_name].append(candidate)
    return cached


def refuse_skipped(skipped: list[Skipped]) -> None:
    """``strict``: raise listing the files that cannot be used, if any."""
    if not skipped:
        return
    listing = "\n".join(f"  {s.path}: {s.reason}" for s in skipped[:50])
    more = f"\n  ... and {len(skipped) - 50} more" if len(skipped) > 50 else ""
    raise ValueError(
        f"strict: {len(skipped)} file(s) cannot be used:\n{listing}{more}\n"
        "Remove or fix them, or set strict: false to skip and list them."
    )


def split_candidates(
    candidates: list[Candidate],
    min_per_class: int,
    max_class_images: int | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[dict[str, list[Candidate]], dict[str, int], Counter]:
    """Phase 2: the in-distribution candidates without the classes under ``min_per_class``, cut
    to ``max_class_images`` per class and split deterministically. Returns the candidates per
    split, the classes dropped (with their sizes) and the images capped per class."""
    sizes = Counter(candidate.label for candidate in candidates)
    dropped = {c: n for c, n in sorted(sizes.items()) if n < min_per_class}
    kept = [candidate for candidate in candidates if candidate.label not in dropped]
    capped: Counter = Counter()
    if max_class_images is not None:
        kept, capped = _at_most_per_class(kept, max_class_images, seed)
    splits = assign_splits(
        [candidate.key for candidate in kept],
        [candidate.label for candidate in kept],
        [candidate.set_name for candidate in kept],
        val_fraction,
        test_fraction,
        seed,
    )
    by_split: dict[str, list[Candidate]] = defaultdict(list)
    for candidate, split in zip(kept, splits, strict=True):
        by_split[split].append(candidate._replace(set_name=split))
    return by_split, dropped, capped


def training_classes(
    sets: dict[str, list[Candidate]], source: str, min_per_class: int
) -> list[str]:
    """The classes of the training split; raises unless there are two or more."""
    classes = sorted({candidate.label for candidate in sets.get("train", [])})
    if not classes:
        raise ValueError(
            f"no training images left in {source} after skipping unreadable files, "
            f"class_map and min_per_class={min_per_class}: check the data settings"
        )
    if len(classes) == 1:
        raise ValueError(
            f"only one class ({classes[0]!r}) in {source}: classifiers and probes need "
            "two or more. Give data.source the folder whose subfolders are the classes, or "
            "check class_map and min_per_class"
        )
    return classes


def assemble_splits(
    sets: dict[str, list[Candidate]], classes: list[str], max_per_class: int | None, seed: int
) -> tuple[dict[str, Split], Counter, dict[str, Counter]]:
    """Phase 3: every set (split or OOD) as a ``Split`` of the training classes, the training
    split cut to ``max_per_class`` images per class when given (the balanced regime), and every
    fixed split present, empty if need be. Returns the splits, the training images left unused
    per class and the images per set and label that are no training class."""
    known = set(classes)
    splits: dict[str, Split] = {}
    unused: Counter = Counter()
    unknown: dict[str, Counter] = defaultdict(Counter)
    for set_name, candidates in sets.items():
        kept = [candidate for candidate in candidates if candidate.label in known]
        for candidate in candidates:
            if candidate.label not in known:
                unknown[set_name][candidate.label] += 1
        if set_name == "train" and max_per_class is not None:
            kept, unused = _at_most_per_class(kept, max_per_class, seed)
        caches = {id(candidate.cache) for candidate in kept}
        assert len(caches) <= 1, f"set {set_name} spans several caches"
        splits[set_name] = Split(
            source=(kept or candidates)[0].cache,
            rows=[candidate.row for candidate in kept],
            labels=[candidate.label for candidate in kept],
        )
    main = sets["train"][0].cache  # every in-distribution image comes from the main source
    for split in FIXED_SPLITS:
        splits.setdefault(split, Split(main, [], []))
    return splits, unused, unknown


def _at_most_per_class(
    candidates: list[Candidate], per_class: int, seed: int
) -> tuple[list[Candidate], Counter]:
    """``candidates`` cut to at most ``per_class`` of each label (``balanced_subset``: the same
    ones on every run), and the count left out per label."""
    labels = [candidate.label for candidate in candidates]
    keys = [candidate.key for candidate in candidates]
    keep = set(balanced_subset(range(len(candidates)), keys, labels, per_class, seed))
    left_out = Counter(label for i, label in enumerate(labels) if i not in keep)
    return [candidate for i, candidate in enumerate(candidates) if i in keep], left_out
