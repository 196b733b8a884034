from collections import Counter

import pytest

from datamodules.splits import assign_splits, balanced_subset, path_hash


def _dataset(sizes: dict[str, int], prefix: str = "") -> tuple[list[str], list[str]]:
    keys, labels = [], []
    for label, n in sizes.items():
        keys += [f"{label}/{prefix}{i:04d}.png" for i in range(n)]
        labels += [label] * n
    return keys, labels


def test_hash_is_uniform_and_seeded():
    values = [path_hash(f"img{i}.png", 0) for i in range(4000)]
    assert 0 <= min(values) and max(values) < 1
    assert abs(sum(values) / len(values) - 0.5) < 0.02
    assert path_hash("a.png", 0) != path_hash("a.png", 1)


def test_splits_are_stratified():
    keys, labels = _dataset({"copepod": 200, "diatom": 50, "larvacean": 10})
    splits = assign_splits(keys, labels, [None] * len(keys), 0.1, 0.2, seed=0)
    per_class = Counter(zip(labels, splits, strict=True))
    for label, n in {"copepod": 200, "diatom": 50, "larvacean": 10}.items():
        assert per_class[(label, "test")] == round(0.2 * n)
        assert per_class[(label, "val")] == round(0.1 * n)
        assert per_class[(label, "train")] == n - round(0.2 * n) - round(0.1 * n)


def test_splits_do_not_depend_on_order():
    keys, labels = _dataset({"a": 30, "b": 20})
    splits = dict(zip(keys, assign_splits(keys, labels, [None] * 50, 0.1, 0.2, 0), strict=True))
    reversed_splits = assign_splits(keys[::-1], labels[::-1], [None] * 50, 0.1, 0.2, 0)
    assert dict(zip(keys[::-1], reversed_splits, strict=True)) == splits


def test_adding_images_moves_few_old_ones():
    keys, labels = _dataset({"a": 200, "b": 100})
    before = dict(zip(keys, assign_splits(keys, labels, [None] * 300, 0.1, 0.2, 0), strict=True))
    new_keys, new_labels = _dataset({"a": 20, "b": 10}, prefix="new")
    all_keys, all_labels = keys + new_keys, labels + new_labels
    after = dict(
        zip(all_keys, assign_splits(all_keys, all_labels, [None] * 330, 0.1, 0.2, 0), strict=True)
    )
    moved = sum(before[k] != after[k] for k in keys)
    assert moved <= 2 * 30  # at most two moves per added image
    assert moved / len(keys) < 0.1


def test_small_classes_have_a_documented_split():
    keys, labels = _dataset({"one": 1, "two": 2, "three": 3})
    splits = assign_splits(keys, labels, [None] * 6, 0.1, 0.2, 0)
    pairs = list(zip(splits, labels, strict=True))
    by_class = {c: sorted(s for s, label in pairs if label == c) for c in labels}
    assert by_class["one"] == ["train"]
    assert by_class["two"] == ["test", "train"]
    assert by_class["three"] == ["test", "train", "val"]


def test_fixed_splits_win_and_trainval_never_goes_to_test():
    keys, labels = _dataset({"a": 40})
    fixed = ["test"] * 10 + ["trainval"] * 30
    splits = assign_splits(keys, labels, fixed, 0.1, 0.2, 0)
    assert splits[:10] == ["test"] * 10
    assert set(splits[10:]) == {"train", "val"}
    assert splits[10:].count("val") == 3


def test_bad_fractions_are_rejected():
    with pytest.raises(ValueError, match="val_fraction"):
        assign_splits(["a"], ["x"], [None], 0.6, 0.5, 0)


def test_balanced_subset_is_deterministic_and_capped():
    keys, labels = _dataset({"a": 50, "b": 5})
    kept = balanced_subset(range(55), keys, labels, per_class=10, seed=0)
    assert Counter(labels[i] for i in kept) == {"a": 10, "b": 5}
    assert kept == balanced_subset(range(55)[::-1], keys, labels, per_class=10, seed=0)
