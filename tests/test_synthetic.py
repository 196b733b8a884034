import csv

import numpy as np
import pytest
from PIL import Image

from datamodules.synthetic import (
    APPEARANCES,
    SyntheticPlankton,
    _distance,
    _taxonomy,
    class_frequencies,
    ensure_dataset,
    generate_images,
    morphotypes,
    write_dataset,
)


def test_siblings_differ_in_one_trait_and_families_in_several():
    classes = morphotypes(len(_taxonomy()))
    assert len(classes) > 50
    assert len({m.name for m in classes}) == len(classes)  # every class looks different
    for k in range(0, len(classes), 2):
        assert _distance(classes[k], classes[k + 1]) == 1
    families = classes[::2]
    for i, a in enumerate(families):
        for b in families[i + 1 :]:
            assert _distance(a, b) >= 3


def test_morphotypes_do_not_depend_on_the_number_asked_for():
    assert morphotypes(6) == morphotypes(12)[:6]


def test_power_law_frequencies():
    counts = class_frequencies(5, 100, 10.0)
    assert counts[0] == 100 and counts[-1] == 10
    assert counts == sorted(counts, reverse=True)
    assert class_frequencies(3, 50, 1.0) == [50, 50, 50]
    with pytest.raises(ValueError, match="imbalance"):
        class_frequencies(3, 50, 0.5)


def test_generation_is_deterministic_for_a_seed(tiny_spec):
    first = [image for *_, image in generate_images(tiny_spec)]
    again = [image for *_, image in generate_images(tiny_spec)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    other = SyntheticPlankton(**{**tiny_spec.__dict__, "seed": tiny_spec.seed + 1})
    different = [image for *_, image in generate_images(other)]
    assert not np.array_equal(first[0], different[0])


def _domain_images(spec, domain):
    return np.stack([img for d, _, _, img in generate_images(spec) if d == domain]).astype(float)


def test_domains_shift_appearance_and_priors(tiny_spec):
    source = _domain_images(tiny_spec, "source")
    geographic = _domain_images(tiny_spec, "geographic")
    # The geographic instrument images dark objects on a light background.
    assert APPEARANCES["geographic"].dark_on_light
    assert np.median(source[:, 0, :]) < 60 < 180 < np.median(geographic[:, 0, :])
    labels = {
        d: [c for dd, c, _, _ in generate_images(tiny_spec) if dd == d]
        for d in ("source", "temporal")
    }
    most_common = {d: max(set(v), key=v.count) for d, v in labels.items()}
    assert most_common["source"] != most_common["temporal"]


def test_written_dataset_has_class_folders_and_manifest(tmp_path, tiny_spec):
    manifest = write_dataset(tiny_spec, tmp_path / "synth", progress=False)
    rows = list(csv.DictReader(open(manifest)))
    assert {r["domain"] for r in rows} == {"source", "temporal", "geographic"}
    assert all(r["split"] == ("" if r["domain"] == "source" else r["domain"]) for r in rows)
    first = tmp_path / "synth" / rows[0]["path"]
    assert first.parent.name == rows[0]["label"]
    assert Image.open(first).size == (tiny_spec.size, tiny_spec.size)
    with pytest.raises(FileExistsError, match="not empty"):
        write_dataset(tiny_spec, tmp_path / "synth", progress=False)


def test_ensure_dataset_generates_once(tmp_path, tiny_spec):
    manifest = ensure_dataset(tiny_spec, tmp_path, progress=False)
    stamp = manifest.stat().st_mtime_ns
    assert ensure_dataset(tiny_spec, tmp_path, progress=False) == manifest
    assert manifest.stat().st_mtime_ns == stamp
    assert not [p for p in manifest.parent.parent.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    "settings, option",
    [
        ({"domains": ["temporal"]}, "domains"),
        ({"size": 8}, "size"),
        ({"per_class": 0}, "per_class"),
    ],
)
def test_bad_settings_name_the_option(settings, option):
    with pytest.raises(ValueError, match=option):
        SyntheticPlankton(**settings)


def test_asking_for_too_many_classes_says_how_many_exist():
    with pytest.raises(ValueError, match=f"between 2 and {len(_taxonomy())}"):
        morphotypes(len(_taxonomy()) + 1)
