"""Classifying a folder of new images (one instrument sample) with a trained checkpoint.

Ecologists need two answers from a sample: what each image most likely is, with the runner-up
labels for review, and how many of each class it holds (the abundance table). A model is only as
good as the match between its training images and the new ones, so new images go through the
datamodule's own decoding and preprocessing (padding with the image's background, polarity,
resizing to the checkpoint's size and channels) and its evaluation view, never a copy of them.
Checkpoints are read with ``torch.load(weights_only=True)``: opening a file shared by a colleague
runs no code from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from datamodules.preprocessing import (
    IMAGE_SUFFIXES,
    ImageReadError,
    Preprocessing,
    load_preprocessed,
)
from datamodules.store import write_csv_atomic
from datamodules.views import eval_view
from lightning_modules import (
    METHODS,
    DiffusionFeatures,
    EncoderFeatures,
    PixelFeatures,
    PlanktonModule,
    ProbeModule,
    method_of,
)
from lightning_modules.common.module import load_checkpoint

# The only classes a probe checkpoint may name as its feature source: a file never chooses code.
FEATURE_SOURCES = {
    f"lightning_modules.{cls.__name__}": cls
    for cls in (DiffusionFeatures, EncoderFeatures, PixelFeatures)
}

# A probe, or a method that learns from labels (``per_regime`` in the registry).
Classifier = PlanktonModule
# Decoding failures that make one file unusable without stopping the sample.
_UNREADABLE = (ImageReadError, Image.DecompressionBombError, OSError, ValueError)


@dataclass(frozen=True)
class ClassifierSettings:
    """How the checkpoint's training images were preprocessed: new images must match them.

    ``polarity``, ``max_aspect`` and ``max_pixels`` come from the data settings stored in the
    checkpoint; a checkpoint without them gets the configs' values.
    """

    kind: str
    image_size: int
    in_chans: int
    polarity: Literal["keep", "auto"] = "auto"
    max_aspect: float = 4.0
    max_pixels: int = Preprocessing.max_pixels

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing(
            self.image_size, self.in_chans, self.polarity, self.max_aspect, self.max_pixels
        )


def load_classifier(path: str | Path) -> tuple[Classifier, ClassifierSettings]:
    """The classifier of a probe checkpoint, or of a registered method that learns from labels
    (the supervised baseline), in eval mode on the CPU, and the preprocessing its training images
    had.

    A probe is rebuilt from its recorded feature source (a whitelisted class; its weights come
    from the probe checkpoint itself). Label-free methods (diffusion, SimCLR, DINO...) learned
    features, not classes: they are refused with the command that probes them.

    Raises:
        FileNotFoundError: ``path``, or the checkpoint a probe's features are read through, is
            missing.
        ValueError: the file is not a checkpoint of a classifier.
    """
    checkpoint = load_checkpoint(path)
    path = Path(path)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    method = method_of(checkpoint["state_dict"])
    if "feature_source" in checkpoint:
        module: Classifier = _load_probe(path, checkpoint["feature_source"], hparams)
        module.load_state_dict(checkpoint["state_dict"])
        kind = "probe"
    elif method is not None and METHODS[method].per_regime:
        module = METHODS[method].module.from_checkpoint(checkpoint)
        kind = method
    else:
        raise ValueError(_not_a_classifier(path, method, hparams))
    data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    settings = ClassifierSettings(
        kind=kind,
        image_size=int(data.get("image_size", hparams["image_size"])),
        in_chans=int(data.get("channels", hparams["in_chans"])),
        polarity=data.get("polarity", "auto"),
        max_aspect=float(data.get("max_aspect", 4.0)),
        max_pixels=int(data.get("max_image_pixels", Preprocessing.max_pixels)),
    )
    return module.eval(), settings


def _load_probe(path: Path, spec: dict, hparams: dict) -> ProbeModule:
    source_class = FEATURE_SOURCES.get(spec.get("class_path"))
    if source_class is None:
        raise ValueError(
            f"{path}: feature source {spec.get('class_path')!r} is not one of "
            f"{', '.join(sorted(FEATURE_SOURCES))}"
        )
    init_args = dict(spec.get("init_args") or {})
    try:
        features = source_class(**init_args)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"the probe {path} is built on {init_args.get('checkpoint')}, which is missing "
            f"({error}): put that checkpoint back at its path"
        ) from None
    return ProbeModule.from_settings({**hparams, "features": features})


def _not_a_classifier(path: Path, method: str | None, hparams: dict) -> str:
    if method is not None:
        probe = METHODS[method].probe
        return (
            f"{path} comes from {METHODS[method].display_name} pretraining: it learned features, "
            f"not classes. Probe it first (plankton fit --config configs/probe_{probe}.yaml "
            f"--model.init_args.features.init_args.checkpoint {path}) and classify with the "
            "probe's checkpoint"
        )
    if "select_metric" in hparams:
        return (
            f"{path} is a probe checkpoint that does not record its feature source (saved before "
            "probes did, or over a source built in memory): refit the probe with "
            "`plankton fit --config configs/probe_encoder.yaml` or `probe_diffusion.yaml`"
        )
    classifiers = [m.display_name for m in METHODS.values() if m.per_regime]
    return f"{path} is neither a probe checkpoint nor one of {', '.join(classifiers)}"


def image_files(root: Path) -> list[Path]:
    """Every image below ``root``, sorted; hidden files and folders are skipped as the
    datamodule skips them (``.DS_Store``, ``._x.png`` resource forks are not images)."""
    return sorted(
        (
            p
            for p in root.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )


def check_outputs(paths: list[Path], overwrite: bool) -> None:
    """Refuse to write over a folder, a file that is not a CSV, or (without ``overwrite``) any
    existing file: a mistyped ``--out`` must not replace someone's data."""
    for path in paths:
        if path.suffix.lower() != ".csv":
            raise ValueError(f"--out {path} must name a .csv file")
        if path.is_dir():
            raise ValueError(f"--out {path} is a folder; name a .csv file")
        if path.exists() and not overwrite:
            raise FileExistsError(
                f"{path} exists; choose another --out or pass --overwrite to replace it"
            )


def classify_folder(
    checkpoint: str | Path,
    images: str | Path,
    out: str | Path,
    top_k: int = 3,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    overwrite: bool = False,
) -> dict:
    """Classify every image below ``images`` and write ``out`` (top-k labels per image),
    ``<stem>_counts.csv`` (the abundance table) and ``<stem>_skipped.csv``.

    ``out`` must be a ``.csv`` path; none of the three files may exist unless ``overwrite``,
    which is checked before any image is read, so a long sample never ends in a refusal.

    A sample often holds a few broken files; they are listed with their reason instead of
    stopping the run. Images are read in batches of ``batch_size``, so a sample of any size fits
    in memory. For a probe over diffusion features, image ``i`` of the sorted listing is noised
    as image ``i`` of a split is: results do not depend on ``batch_size``. ``device`` defaults
    to the GPU when there is one.

    Returns:
        ``images`` (classified) and ``skipped`` (counts), ``counts`` (``{class: n}``, every
        class, most frequent first), ``top_k`` (after clamping to the number of classes),
        ``device`` and ``outputs`` (the three paths).
    """
    root = Path(images)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    out = Path(out)
    outputs = [
        out,
        out.with_name(f"{out.stem}_counts.csv"),
        out.with_name(f"{out.stem}_skipped.csv"),
    ]
    check_outputs(outputs, overwrite)
    if top_k < 1 or batch_size < 1:
        raise ValueError(f"top_k and batch_size must be at least 1, got {top_k} and {batch_size}")
    files = image_files(root)
    if not files:
        raise ValueError(
            f"no image files in {root} or its subfolders "
            f"(suffixes {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    module, settings = load_classifier(checkpoint)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module.to(device).eval()
    classes = list(module.class_names)
    k = min(top_k, len(classes))
    preprocessing = settings.preprocessing
    view = eval_view(settings.image_size, settings.in_chans)

    rows: list[list[str]] = []
    skipped: list[tuple[str, str]] = []
    counts = [0] * len(classes)
    for start in range(0, len(files), batch_size):
        arrays, names = [], []
        for file in files[start : start + batch_size]:
            name = file.relative_to(root).as_posix()
            try:
                arrays.append(load_preprocessed(file, preprocessing))
            except _UNREADABLE as error:
                skipped.append((name, str(error) or type(error).__name__))
                continue
            names.append(name)
        if not arrays:
            continue
        batch = view(torch.from_numpy(np.stack(arrays))).to(device)
        indices = torch.arange(len(rows), len(rows) + len(batch))
        with torch.no_grad():
            probabilities = _classify(module, batch, indices).float().softmax(-1).cpu()
        values, labels = probabilities.topk(k, dim=-1)
        for name, top_values, top_labels in zip(names, values, labels, strict=True):
            counts[int(top_labels[0])] += 1
            row = [name]
            for value, label in zip(top_values.tolist(), top_labels.tolist(), strict=True):
                row += [classes[label], f"{value:.4f}"]
            rows.append(row)
    if not rows:
        examples = "; ".join(f"{name} ({reason})" for name, reason in skipped[:3])
        raise ValueError(
            f"no readable image in {root}: all {len(skipped)} image files failed, e.g. {examples}"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    _, counts_path, skipped_path = outputs
    header = ["path"] + [f"{kind}_{i}" for i in range(1, k + 1) for kind in ("label", "prob")]
    order = sorted(range(len(classes)), key=lambda i: -counts[i])  # ties keep the class order
    write_csv_atomic(out, header, rows)
    write_csv_atomic(
        counts_path,
        ["class", "count", "fraction"],
        [[classes[i], counts[i], f"{counts[i] / len(rows):.4f}"] for i in order],
    )
    write_csv_atomic(skipped_path, ["path", "reason"], skipped)
    return {
        "images": len(rows),
        "skipped": len(skipped),
        "counts": {classes[i]: counts[i] for i in order},
        "top_k": k,
        "device": str(device),
        "outputs": {
            "predictions": str(out),
            "counts": str(counts_path),
            "skipped": str(skipped_path),
        },
    }


def _classify(module: Classifier, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Logits; a probe also takes the indices that key its per-image diffusion noise."""
    if isinstance(module, ProbeModule):
        return module.classify(images, indices)
    return module.classify(images)
