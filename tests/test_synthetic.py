import csv
import hashlib
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from cli import main
from datamodules.organisms import _distance, _taxonomy
from datamodules.synthetic import (
    APPEARANCES,
    SyntheticPlankton,
    class_frequencies,
    domain_counts,
    domain_fractions,
    ensure_dataset,
    generate_images,
    morphotypes,
    prior_shift_size,
    write_dataset,
)

# Counts need no rendering, so the prior tests can afford the demo's sizes.
DEMO_COUNTS = {"classes": 12, "per_class": 300, "imbalance": 10.0, "ood_fraction": 0.3}


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
        ({"temporal_prior_shift": -0.1}, "temporal_prior_shift"),
        ({"temporal_prior_shift": 1.5}, "temporal_prior_shift"),
    ],
)
def test_bad_settings_name_the_option(settings, option):
    with pytest.raises(ValueError, match=option):
        SyntheticPlankton(**settings)


def test_asking_for_too_many_classes_says_how_many_exist():
    with pytest.raises(ValueError, match=f"between 2 and {len(_taxonomy())}"):
        morphotypes(len(_taxonomy()) + 1)


@pytest.mark.parametrize("settings", [DEMO_COUNTS, {"classes": 5, "per_class": 40}])
def test_no_prior_shift_keeps_the_source_priors(settings):
    spec = SyntheticPlankton(**settings, temporal_prior_shift=0.0)
    fractions = domain_fractions(spec)
    # Whole images: each fraction is within one image of the source's.
    rounding = 1 / sum(domain_counts(spec)["temporal"])
    assert fractions["temporal"] == pytest.approx(fractions["source"], abs=rounding)
    assert prior_shift_size(spec) <= spec.classes * rounding / 2


def test_every_class_appears_in_a_tiny_shifted_set():
    # 6 temporal images for 5 classes: the tail classes' shares round to none.
    specs = [SyntheticPlankton(classes=5, per_class=7, temporal_prior_shift=s) for s in (0, 0.5, 1)]
    counts = [domain_counts(spec)["temporal"] for spec in specs]
    assert all(min(c) == 1 and sum(c) == 6 for c in counts)
    assert counts[0] == [2, 1, 1, 1, 1]


def test_prior_shift_grows_with_the_setting_and_keeps_the_set_size():
    settings = [0.0, 0.25, 0.5, 0.75, 1.0]
    specs = [SyntheticPlankton(**DEMO_COUNTS, temporal_prior_shift=s) for s in settings]
    sizes = [prior_shift_size(spec) for spec in specs]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    # The fractions are a mixture, so the distance grows linearly, up to whole images.
    assert sizes == pytest.approx([s * sizes[-1] for s in settings], abs=0.01)
    assert len({sum(domain_counts(spec)["temporal"]) for spec in specs}) == 1
    # The geographic set does not depend on the temporal setting.
    assert len({tuple(domain_counts(spec)["geographic"]) for spec in specs}) == 1


def test_default_prior_shift_keeps_the_counts_from_before_the_setting():
    # Until the setting existed the temporal set was the power law rotated by a third.
    spec = SyntheticPlankton(**DEMO_COUNTS)
    counts = class_frequencies(spec.classes, round(spec.per_class * spec.ood_fraction), 10.0)
    third = spec.classes // 3
    assert domain_counts(spec)["temporal"] == counts[-third:] + counts[:-third]


def test_manifest_and_class_fractions_file_hold_the_true_priors(tmp_path):
    spec = SyntheticPlankton(
        classes=4, per_class=8, size=16, domains=["source", "temporal"], temporal_prior_shift=0.5
    )
    manifest = write_dataset(spec, tmp_path / "synth", progress=False)
    rows = list(csv.DictReader(open(manifest)))
    names = [m.name for m in morphotypes(spec.classes)]
    truth = json.loads((manifest.parent / "class_fractions.json").read_text())
    for domain, fractions in domain_fractions(spec).items():
        found = Counter(r["label"] for r in rows if r["domain"] == domain)
        total = sum(found.values())
        assert [found[name] / total for name in names] == pytest.approx(fractions)
        assert list(truth[domain]["fractions"].values()) == pytest.approx(fractions)
        assert truth[domain]["counts"] == {name: found[name] for name in names}
    assert truth["temporal"]["prior_shift"] == pytest.approx(prior_shift_size(spec))
    assert truth["source"]["prior_shift"] == 0


def test_cli_passes_the_prior_shift_and_prints_its_size(tmp_path, capsys):
    out = tmp_path / "synth"
    options = "--classes 3 --per-class 4 --size 16 --domains source,temporal"
    code = main(
        ["data", "synth", "--out", str(out), *options.split(), "--temporal-prior-shift", "0.4"]
    )
    assert code == 0
    spec = SyntheticPlankton(**json.loads((out / "settings.json").read_text()))
    assert spec.temporal_prior_shift == 0.4
    assert f"temporal class-prior shift {prior_shift_size(spec):.3f}" in capsys.readouterr().out
    assert (
        main(["data", "synth", "--out", str(tmp_path / "bad"), "--temporal-prior-shift", "2"]) == 2
    )
    assert "temporal_prior_shift must be between 0 and 1" in capsys.readouterr().err


def test_generated_pixels_do_not_change():
    # The digest of a small dataset as generated before the drawing moved to its own module:
    # every cache and figure built on the synthetic data depends on these exact pixels.
    spec = SyntheticPlankton(
        classes=4, per_class=3, imbalance=2.0, size=16, ood_fraction=0.5, seed=7
    )
    digest = hashlib.sha256()
    for domain, name, index, image in generate_images(spec):
        digest.update(f"{domain}/{name}/{index}".encode())
        digest.update(image.tobytes())
    assert digest.hexdigest() == "5da8bf102b7c30a6eb375ae1c10b3d993073799e0914ca91884f0e29d848f7a8"
