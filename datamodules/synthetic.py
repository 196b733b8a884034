"""Procedural plankton-like images: the embedded default dataset.

Every class is a morphotype, a combination of traits (cell shape, chain length, spines, texture,
appendage). Classes come in sibling pairs that differ in one trait only, so telling them apart needs
fine detail, the way plankton taxa do. Individuals vary by nuisance factors (rotation, scale,
position, blur, brightness, sensor noise, debris) that a linear model on raw pixels cannot undo.

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
import functools
import hashlib
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from .splits import largest_remainder

DOMAINS = ("source", "temporal", "geographic")
MANIFEST_NAME = "manifest.csv"
# Fixed, so that class k is the same morphotype in every generated dataset, whatever its seed.
_TAXONOMY_SEED = 2601

TRAITS: dict[str, tuple] = {
    "shape": ("round", "oval", "rod"),
    "cells": (1, 2, 4, 6),
    "spines": (0, 2, 4, 8),
    "spine_length": ("short", "long"),
    "texture": ("smooth", "striped", "dotted"),
    "appendage": ("none", "tail", "antennae"),
}
_ASPECT = {"round": 1.0, "oval": 0.62, "rod": 0.38}
_SPINE_LENGTH = {"short": 0.8, "long": 2.0}


@dataclass(frozen=True)
class Morphotype:
    """One synthetic taxon: a value for every trait in ``TRAITS``."""

    shape: str
    cells: int
    spines: int
    spine_length: str
    texture: str
    appendage: str

    @property
    def name(self) -> str:
        spines = f"spines{self.spines}{self.spine_length}" if self.spines else "nospines"
        return f"{self.shape}_chain{self.cells}_{spines}_{self.texture}_{self.appendage}"


@dataclass(frozen=True)
class Appearance:
    """How an instrument and a place render a morphotype."""

    size: float = 1.0
    blur: float = 1.0
    contrast: float = 1.0
    noise: float = 0.03
    background: float = 0.04
    dark_on_light: bool = False
    spine_stretch: float = 1.0
    aspect_stretch: float = 1.0
    texture_period: float = 1.0


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


def _all_morphotypes() -> list[Morphotype]:
    """Every distinct trait combination: spine length means nothing without spines."""
    combos = (Morphotype(*values) for values in itertools.product(*TRAITS.values()))
    return [m for m in combos if m.spines or m.spine_length == TRAITS["spine_length"][0]]


@functools.cache
def _taxonomy() -> tuple[Morphotype, ...]:
    """Sibling pairs (2k, 2k+1) that differ in one trait; families (the even classes) differ from
    each other in at least three traits. Built once, in a fixed order."""
    combos = _all_morphotypes()
    valid = set(combos)
    order = np.random.default_rng(_TAXONOMY_SEED).permutation(len(combos))
    trait_names = list(TRAITS)
    chosen: list[Morphotype] = []
    for index in order:
        family = combos[index]
        if family in chosen or any(_distance(family, other) < 3 for other in chosen[::2]):
            continue
        first = len(chosen) // 2 % len(trait_names)
        sibling = next(
            (
                candidate
                for trait in trait_names[first:] + trait_names[:first]
                for candidate in _variants(family, trait)
                if candidate in valid and candidate not in chosen
            ),
            None,
        )
        if sibling is not None:
            chosen += [family, sibling]
    return tuple(chosen)


def morphotypes(num_classes: int) -> list[Morphotype]:
    """The first ``num_classes`` morphotypes: sibling pairs (2k, 2k+1) differ in one trait."""
    available = len(_taxonomy())
    if not 2 <= num_classes <= available:
        raise ValueError(f"classes must be between 2 and {available}, got {num_classes}")
    return list(_taxonomy()[:num_classes])


def _distance(a: Morphotype, b: Morphotype) -> int:
    return sum(x != y for x, y in zip(asdict(a).values(), asdict(b).values(), strict=True))


def _variants(family: Morphotype, trait: str) -> list[Morphotype]:
    """``family`` with ``trait`` set to each of its other values."""
    current = getattr(family, trait)
    return [Morphotype(**{**asdict(family), trait: v}) for v in TRAITS[trait] if v != current]


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


class _Canvas:
    """Pixel coordinates of one image size and the drawing primitives on them."""

    def __init__(self, size: int) -> None:
        self.size = size
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
        self.points = np.stack([xs.ravel(), ys.ravel()], axis=1)

    def ellipse(
        self, center: np.ndarray, a: float, b: float, angle: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """Normalised radius and the coordinate along the major axis, for every pixel."""
        d = self.points - center
        cos, sin = np.cos(angle), np.sin(angle)
        u = d[:, 0] * cos + d[:, 1] * sin
        v = -d[:, 0] * sin + d[:, 1] * cos
        return np.sqrt((u / a) ** 2 + (v / b) ** 2), u

    def segments(self, starts: np.ndarray, ends: np.ndarray, width: float) -> np.ndarray:
        """Soft lines along every segment, merged by maximum."""
        if len(starts) == 0:
            return np.zeros(len(self.points), np.float32)
        ab = ends - starts
        ap = self.points[None, :, :] - starts[:, None, :]
        t = np.clip(
            (ap * ab[:, None, :]).sum(-1) / np.maximum((ab**2).sum(-1), 1e-6)[:, None], 0, 1
        )
        dist2 = ((ap - t[..., None] * ab[:, None, :]) ** 2).sum(-1).min(0)
        return np.exp(-dist2 / width**2)

    def blobs(self, centers: np.ndarray, radii: np.ndarray) -> np.ndarray:
        if len(centers) == 0:
            return np.zeros(len(self.points), np.float32)
        dist2 = ((self.points[None] - centers[:, None]) ** 2).sum(-1)
        return np.exp(-dist2 / radii[:, None] ** 2).max(0)


def render(
    morph: Morphotype, rng: np.random.Generator, canvas: _Canvas, look: Appearance
) -> np.ndarray:
    """One individual of ``morph`` as a uint8 greyscale image."""
    size = canvas.size
    angle = rng.uniform(0, 2 * np.pi)
    axis = np.array([np.cos(angle), np.sin(angle)], np.float32)
    normal = np.array([-axis[1], axis[0]], np.float32)
    center = size / 2 + rng.uniform(-0.1, 0.1, 2).astype(np.float32) * size
    a = size * rng.uniform(0.075, 0.11) * look.size
    a = min(a, 0.8 * size / (2 * morph.cells + 1))
    b = a * _ASPECT[morph.shape] * look.aspect_stretch * rng.uniform(0.92, 1.08)
    # Chains grow perpendicular to each cell's long axis, with a gentle random curve.
    spacing = 2 * b * 1.05
    bend = rng.uniform(-0.25, 0.25)
    offsets = (np.arange(morph.cells) - (morph.cells - 1) / 2) * spacing
    cells = center + offsets[:, None] * normal + (bend * offsets**2 / size)[:, None] * axis

    body = np.zeros(len(canvas.points), np.float32)
    for cell in cells:
        radius, u = canvas.ellipse(cell, a, b, angle)
        inside = np.clip((1 - radius) * a / 1.2, 0, 1)
        membrane = np.exp(-(((radius - 1) * a / 0.9) ** 2))
        period = a * 0.55 * look.texture_period
        if morph.texture == "striped":
            detail = 0.5 + 0.5 * np.cos(2 * np.pi * u / period)
        elif morph.texture == "dotted":
            dots = cell + rng.uniform(-0.6, 0.6, (5, 2)) * [a, b] @ _rotation(angle).T
            detail = canvas.blobs(dots, np.full(5, max(0.7, 0.14 * a)))
        else:
            detail = np.full_like(radius, 0.5)
        body = np.maximum(body, inside * (0.35 + 0.45 * detail) + 0.7 * membrane)

    starts, ends = _spines(morph, cells, a, b, angle, rng, look)
    tail_starts, tail_ends = _appendage(morph, cells, a, normal, axis, size, rng)
    lines = canvas.segments(
        np.concatenate([starts, tail_starts]), np.concatenate([ends, tail_ends]), 0.55
    )
    debris_count = rng.poisson(3)
    debris = canvas.blobs(
        rng.uniform(0, size, (debris_count, 2)), rng.uniform(0.4, 1.3, debris_count)
    ) * rng.uniform(0.2, 0.7)

    image = np.maximum(np.maximum(body, 0.8 * lines), debris).reshape(size, size)
    image = gaussian_filter(image, rng.uniform(0.3, 0.9) * look.blur)
    image = image * rng.uniform(0.65, 1.0) * look.contrast
    image = look.background + image + rng.normal(0, look.noise, image.shape)
    if look.dark_on_light:
        image = 1 - image
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def _rotation(angle: float) -> np.ndarray:
    return np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], np.float32)


def _spines(
    morph: Morphotype,
    cells: np.ndarray,
    a: float,
    b: float,
    angle: float,
    rng: np.random.Generator,
    look: Appearance,
) -> tuple[np.ndarray, np.ndarray]:
    if morph.spines == 0:
        return np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)
    starts, ends = [], []
    length = _SPINE_LENGTH[morph.spine_length] * a * look.spine_stretch
    for cell in cells:
        directions = angle + 2 * np.pi * (np.arange(morph.spines) + 0.25) / morph.spines
        directions = directions + rng.normal(0, 0.12, morph.spines)
        unit = np.stack([np.cos(directions), np.sin(directions)], 1)
        root = cell + unit * min(a, b) * 0.9
        starts.append(root)
        ends.append(root + unit * length * rng.uniform(0.85, 1.15, (morph.spines, 1)))
    return np.concatenate(starts).astype(np.float32), np.concatenate(ends).astype(np.float32)


def _appendage(
    morph: Morphotype,
    cells: np.ndarray,
    a: float,
    normal: np.ndarray,
    axis: np.ndarray,
    size: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    if morph.appendage == "none":
        return np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32)
    if morph.appendage == "tail":
        # A wavy tail leaving the last cell along the chain direction.
        steps = np.linspace(0, 0.38 * size, 9)
        phase = rng.uniform(0, 2 * np.pi)
        wave = 0.05 * size * np.sin(steps / (0.09 * size) + phase)
        points = cells[-1] + (steps[:, None] + a) * normal + wave[:, None] * axis
        return points[:-1].astype(np.float32), points[1:].astype(np.float32)
    # Two antennae spreading from the first cell.
    spread = rng.uniform(0.35, 0.55)
    starts, ends = [], []
    for sign in (-1, 1):
        direction = -normal * np.cos(spread) + sign * axis * np.sin(spread)
        starts.append(cells[0] - normal * a)
        ends.append(cells[0] - normal * a + direction * 0.3 * size)
    return np.array(starts, np.float32), np.array(ends, np.float32)


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
    canvas = _Canvas(spec.size)
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
