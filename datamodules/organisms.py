"""Synthetic organisms: the taxonomy of morphotypes and the drawing of one individual.

Every class is a morphotype, a combination of traits (cell shape, chain length, spines, texture,
appendage); ``render`` draws one individual of it as an instrument (an ``Appearance``) sees it.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import asdict, dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

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


class Canvas:
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
    morph: Morphotype, rng: np.random.Generator, canvas: Canvas, look: Appearance
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
