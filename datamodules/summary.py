"""What the DataModule made of a dataset: classes, counts per set, and every image left out."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from .candidates import Cached, Split
from .sources import FIXED_SPLITS, Skipped


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


def summarize(
    classes: list[str],
    splits: dict[str, Split],
    cached: Cached,
    dropped_classes: dict[str, int],
    capped: Counter,
    unused_train: Counter,
    unknown: dict[str, Counter],
) -> DatasetSummary:
    """The summary of the three phases' results (see ``candidates``), every set in
    ``split_order``; ``unknown`` adds to the images ``class_map`` excluded."""
    excluded: dict[str, Counter] = defaultdict(Counter)
    for part in (cached.excluded, unknown):
        for set_name, counts in part.items():
            excluded[set_name] += counts
    counts = {
        name: {c: Counter(split.labels)[c] for c in classes} for name, split in splits.items()
    }
    return DatasetSummary(
        classes=classes,
        counts=dict(sorted(counts.items(), key=lambda kv: split_order(kv[0]))),
        skipped=cached.skipped,
        dropped_classes=dropped_classes,
        excluded={k: dict(sorted(v.items())) for k, v in sorted(excluded.items())},
        unused_train=dict(sorted(unused_train.items())),
        capped=dict(sorted(capped.items())),
        warnings=cached.notes,
    )


def split_order(name: str) -> tuple[int, str]:
    """Sorts train, val and test first, then the OOD sets by name."""
    return (FIXED_SPLITS.index(name), "") if name in FIXED_SPLITS else (len(FIXED_SPLITS), name)
