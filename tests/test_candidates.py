"""The DataModule's three phases on hand-made candidates, without files or a Trainer."""

import numpy as np

from datamodules.cache import CachedImages
from datamodules.candidates import Candidate, assemble_splits, split_candidates


def _cache() -> CachedImages:
    return CachedImages(np.zeros((0, 1, 4, 4), np.uint8), np.ones(0, bool), [], "cache.npy")


def _candidates(cache: CachedImages, counts: dict[str, int]) -> list[Candidate]:
    labels = [label for label, count in counts.items() for _ in range(count)]
    return [
        Candidate(cache, row, f"{label}/{row}", label, None) for row, label in enumerate(labels)
    ]


def test_small_classes_are_dropped_and_the_rest_split():
    cache = _cache()
    sets, dropped, capped = split_candidates(
        _candidates(cache, {"copepod": 20, "diatom": 10, "rare": 2}),
        min_per_class=3,
        max_class_images=10,
        val_fraction=0.2,
        test_fraction=0.2,
        seed=0,
    )
    assert dropped == {"rare": 2} and capped == {"copepod": 10}
    assert sorted(sets) == ["test", "train", "val"]
    assert sum(map(len, sets.values())) == 20
    assert all(c.set_name == name for name, members in sets.items() for c in members)


def test_assembled_sets_keep_the_training_classes_and_every_fixed_split():
    cache, ood = _cache(), _cache()
    sets = {
        "unseen": [
            Candidate(ood, 0, "u/0", "copepod", "unseen"),
            Candidate(ood, 1, "u/1", "x", "unseen"),
        ],
        "train": _candidates(cache, {"copepod": 5, "diatom": 2}),
    }
    splits, unused, unknown = assemble_splits(sets, ["copepod", "diatom"], 3, seed=0)
    assert unused == {"copepod": 2} and unknown == {"unseen": {"x": 1}}
    assert splits["unseen"].source is ood and splits["unseen"].rows == [0]
    assert sorted(splits["train"].labels) == ["copepod"] * 3 + ["diatom"] * 2
    assert splits["val"].rows == splits["test"].rows == [] and splits["val"].source is cache
