"""Procedural plankton-like images: the embedded default dataset, its domains and its files.

The classes are the morphotypes of ``organisms``: sibling pairs that differ in one trait only, so
telling them apart needs fine detail, the way plankton taxa do. Individuals vary by nuisance
factors (rotation, scale, position, blur, brightness, sensor noise, debris) that a linear model on
raw pixels cannot undo.

Domains model the distribution shifts ecologists meet:
- ``source``: the training instrument and season (bright objects on a dark background);
- ``temporal``: another season, with a mild drift in size and focus and class priors moved from the
  source's by a chosen amount (``temporal_prior_shift``; ``prior_shift_size`` measures it), so that
  abundance estimators can be checked against a known truth;
- ``geographic``: another site and instrument, with changed morphology within each class and
  another camera (dark objects on a light background, lower contrast, more noise).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .organisms import Appearance, Canvas, morphotypes, render
from .splits import largest_remainder

DOMAINS = ("source", "temporal", "geographic")
MANIFEST_NAME = "manifest.csv"
# How each domain's instrument and place render the morphotypes.
APPEARANCES = {
    "source": Appearance(),
    "temporal": Appearance(size=1.12, blur=1.6),
    "geographic": Appearance(
        contrast=0.75,
        noise=0.06,
        background=0.12,
        dark_on_light=True,
        spine_stretch=1.35,
        aspect_stretch=0.85,
        texture_period=1.4,
    ),
}


def class_frequencies(num_classes: int, per_class: int, imbalance: float) -> list[int]:
    """Images per class following a power law: the head has ``per_class``, the tail
    ``per_class / imbalance`` (at least one)."""
    if imbalance < 1:
        raise ValueError(f"imbalance must be >= 1 (1 means balanced), got {imbalance}")
    ranks = np.arange(num_classes) / max(num_classes - 1, 1)
    return [max(1, round(per_class * imbalance**-r)) for r in ranks]


def _domain_counts(domain: str, spec: SyntheticPlankton) -> list[int]:
    source = class_frequencies(spec.classes, spec.per_class, spec.imbalance)
    if domain == "source":
        return source
    per_class = max(2, round(spec.per_class * spec.ood_fraction))
    counts = class_frequencies(spec.classes, per_class, spec.imbalance)
    # Another season or site has other dominant taxa: rotate which classes are common.
    shift = spec.classes // 3 if domain == "temporal" else spec.classes // 2
    rotated = counts[-shift:] + counts[:-shift] if shift else counts
    if domain == "geographic":
        return rotated
    # The season's priors lie between the source's and the rotated ones, and the set keeps its
    # size at every setting, so that only the priors change. At 1 the fractions are exactly the
    # rotated counts' and the apportioning gives those counts back, as before the setting existed.
    mix = spec.temporal_prior_shift
    fractions = (1 - mix) * _normalised(source) + mix * _normalised(rotated)
    return _apportion(sum(counts), fractions)


def _normalised(counts: Sequence[int]) -> np.ndarray:
    return np.asarray(counts, float) / sum(counts)


def _apportion(total: int, fractions: np.ndarray) -> list[int]:
    """``total`` images split in proportion to ``fractions`` by largest remainders, so that they
    add up to ``total``. Every class must appear in every domain, so a class left empty then takes
    one image from the class furthest above its share; in a set of few images per class that can
    move the fractions by more than one image's worth."""
    exact = total * fractions
    counts = largest_remainder(fractions, total)
    for empty in np.flatnonzero(counts == 0):
        donors = np.flatnonzero(counts > 1)
        counts[donors[np.argmax((counts - exact)[donors])]] -= 1
        counts[empty] = 1
    return counts.tolist()


def domain_counts(spec: SyntheticPlankton) -> dict[str, list[int]]:
    """Images per class (in class order) of every domain that ``spec`` generates."""
    return {d: _domain_counts(d, spec) for d in DOMAINS if d in spec.domains}


def domain_fractions(spec: SyntheticPlankton) -> dict[str, list[float]]:
    """The true class priors of every domain that ``spec`` generates: each class's fraction of
    the domain's images, in class order."""
    return {d: (np.asarray(c) / sum(c)).tolist() for d, c in domain_counts(spec).items()}


def prior_shift_size(spec: SyntheticPlankton, domain: str = "temporal") -> float:
    """How far ``domain``'s class priors lie from the source's: half the L1 distance between the
    two, the fraction of images that would have to change class (0 = the same priors, 1 = no
    class in common)."""
    fractions = domain_fractions(spec)
    if domain not in fractions:
        raise ValueError(f"domain {domain!r} is not among this dataset's domains {spec.domains}")
    source, shifted = np.asarray(fractions["source"]), np.asarray(fractions[domain])
    return float(np.abs(source - shifted).sum() / 2)


@dataclass
class SyntheticPlankton:
    """Settings of a synthetic plankton dataset (``plankton data synth`` and data configs).

    Args:
        classes: number of morphotypes (sibling pairs differ in one trait).
        per_class: images of the most common class in the source domain.
        imbalance: ratio of the most to the least common class (1 = balanced).
        size: side of the generated images in pixels.
        domains: which of ``source``, ``temporal``, ``geographic`` to generate.
        ood_fraction: size of a shifted domain relative to the source, per class.
        temporal_prior_shift: how far the temporal domain's class priors move from the source's,
            from 0 (the source's fractions) to 1 (the most common classes rotated away); the
            temporal set's fractions are that mixture of the two, and ``prior_shift_size`` gives
            the resulting distance. Every class keeps at least one image.
        seed: seed of the individuals (the morphotypes themselves never change).
    """

    classes: int = 12
    per_class: int = 300
    imbalance: float = 10.0
    size: int = 64
    domains: Sequence[str] = field(default_factory=lambda: list(DOMAINS))
    ood_fraction: float = 0.3
    temporal_prior_shift: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.domains = list(self.domains)
        unknown = sorted(set(self.domains) - set(DOMAINS))
        if unknown or "source" not in self.domains:
            raise ValueError(
                f"domains must include 'source' and be among {DOMAINS}, got {self.domains}"
            )
        if self.size < 16:
            raise ValueError(f"size must be at least 16 pixels, got {self.size}")
        if self.per_class < 1:
            raise ValueError(f"per_class must be at least 1, got {self.per_class}")
        if not 0 <= self.temporal_prior_shift <= 1:
            raise ValueError(
                f"temporal_prior_shift must be between 0 and 1, got {self.temporal_prior_shift}"
            )

    def fingerprint(self) -> str:
        """A short hash of every setting: the name of this dataset's cache folder."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def generate_images(spec: SyntheticPlankton) -> Iterator[tuple[str, str, int, np.ndarray]]:
    """Yield ``(domain, class_name, index, image)`` for every image of the dataset."""
    canvas = Canvas(spec.size)
    classes = morphotypes(spec.classes)
    for domain_id, domain in enumerate(DOMAINS):
        if domain not in spec.domains:
            continue
        for class_id, count in enumerate(_domain_counts(domain, spec)):
            for index in range(count):
                rng = np.random.default_rng([spec.seed, domain_id, class_id, index])
                image = render(classes[class_id], rng, canvas, APPEARANCES[domain])
                yield domain, classes[class_id].name, index, image


def write_dataset(spec: SyntheticPlankton, out: str | Path, progress: bool = True) -> Path:
    """Write the dataset as class folders plus ``manifest.csv`` and return the manifest path.

    The source domain has an empty ``split`` (the DataModule splits it); the shifted domains carry
    their own name as ``split``, which the DataModule reads as out-of-distribution test sets.
    Beside the manifest, ``settings.json`` holds ``spec`` and ``class_fractions.json`` the true
    images per class, class fractions and prior shift size (``prior_shift_size``) of every domain.
    The folder appears complete or not at all: it is written under a temporary name and renamed.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        counts = domain_counts(spec)
        total = sum(map(sum, counts.values()))
        rows = []
        images = tqdm(
            generate_images(spec), total=total, desc="synthetic plankton", disable=not progress
        )
        for domain, label, index, image in images:
            relative = f"{label}/{domain}-{index:05d}.png"
            (staging / label).mkdir(exist_ok=True)
            Image.fromarray(image).save(staging / relative)
            rows.append((relative, label, "" if domain == "source" else domain, domain))
        with open(staging / MANIFEST_NAME, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label", "split", "domain"])
            writer.writerows(rows)
        (staging / "settings.json").write_text(json.dumps(asdict(spec), indent=2))
        # The true priors, for scoring abundance estimates without recounting the manifest.
        names = [m.name for m in morphotypes(spec.classes)]
        fractions = domain_fractions(spec)
        truth = {
            domain: {
                "counts": dict(zip(names, counts[domain], strict=True)),
                "fractions": dict(zip(names, fractions[domain], strict=True)),
                "prior_shift": prior_shift_size(spec, domain),
            }
            for domain in counts
        }
        (staging / "class_fractions.json").write_text(json.dumps(truth, indent=2))
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out / MANIFEST_NAME


def ensure_dataset(spec: SyntheticPlankton, cache_dir: str | Path, progress: bool = True) -> Path:
    """The manifest of ``spec``'s dataset in ``cache_dir``, generated on first use."""
    folder = Path(cache_dir) / "synthetic" / spec.fingerprint()
    manifest = folder / MANIFEST_NAME
    if not manifest.exists():
        try:
            write_dataset(spec, folder, progress=progress)
        except OSError:
            # Another process (a DDP rank) renamed the same dataset into place first; the folder
            # is complete whenever the manifest exists, since only complete folders are renamed.
            if not manifest.exists():
                raise
    return manifest
