"""Deterministic, stratified and stable train/val/test splits, and the training regimes.

Every image gets a number in [0, 1) from a hash of its relative path and a seed. Within each class
the images are ordered by that number: the lowest go to test, the next to val, the rest to train,
in the requested proportions. The split is therefore exactly stratified, identical on every
machine, and stable when images are added: an old image changes split only when a new one lands
before it at a class's boundary (at most two moves per added image).

Small classes (documented in docs/data.md): one image goes to train; two images go one to train and
one to test; from three images on, every split with a non-zero fraction gets at least one.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from .sources import TRAINVAL


def path_hash(key: str, seed: int) -> float:
    """A uniform number in [0, 1) that depends only on ``key`` and ``seed``."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _quotas(n: int, val_fraction: float, test_fraction: float, allow_test: bool) -> tuple[int, int]:
    """Number of (test, val) images of a class of ``n`` images."""
    if not allow_test:
        test_fraction = 0.0
    if n == 1:
        return 0, 0
    if n == 2:
        return (1, 0) if test_fraction > 0 else (0, 1 if val_fraction > 0 else 0)
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    while n_test + n_val > n - 1:  # keep at least one training image
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n_test, n_val


def assign_splits(
    keys: Sequence[str],
    labels: Sequence[str],
    fixed: Sequence[str | None],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> list[str]:
    """The split of every image: ``fixed`` wins where given (``trainval`` means train or val)."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in [0, 1) "
            "and sum to less than 1"
        )
    splits: list[str | None] = [s if s != TRAINVAL else None for s in fixed]
    groups: dict[tuple[str, bool], list[int]] = defaultdict(list)
    for index, (label, given) in enumerate(zip(labels, fixed, strict=True)):
        if given is None or given == TRAINVAL:
            groups[(label, given is None)].append(index)
    for (_, allow_test), members in groups.items():
        members.sort(key=lambda i: path_hash(keys[i], seed))
        n_test, n_val = _quotas(len(members), val_fraction, test_fraction, allow_test)
        for rank, index in enumerate(members):
            splits[index] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return splits  # type: ignore[return-value]


def balanced_subset(
    train_indices: Sequence[int],
    keys: Sequence[str],
    labels: Sequence[str],
    per_class: int,
    seed: int,
) -> list[int]:
    """At most ``per_class`` training images per class, the same ones on every run."""
    by_class: dict[str, list[int]] = defaultdict(list)
    for index in train_indices:
        by_class[labels[index]].append(index)
    kept = []
    for members in by_class.values():
        members.sort(key=lambda i: path_hash(keys[i], seed + 1))
        kept += members[:per_class]
    return sorted(kept)


def largest_remainder(fractions: Sequence[float] | np.ndarray, total: int) -> np.ndarray:
    """Whole counts adding up to ``total`` in proportion to ``fractions`` (Hamilton's method):
    the floor of each share, plus one for the largest remainders, so whole shares stay as they
    are. Ties go to the lower index, so the counts never depend on the platform. NaN fractions
    count as zero."""
    exact = np.nan_to_num(np.asarray(fractions, dtype=np.float64)) * total
    counts = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact, kind="stable")[: total - counts.sum()]] += 1
    return counts
