"""Classifying a folder of new images (one instrument sample) with a trained checkpoint.

Ecologists need two answers from a sample: what each image most likely is, with the runner-up
labels for review, and how many of each class it holds (the abundance table). A model is only as
good as the match between its training images and the new ones, so new images go through the
datamodule's own decoding and preprocessing (padding with the image's background, polarity,
resizing to the checkpoint's size and channels) and its evaluation view, never a copy of them.
Checkpoints are read with ``torch.load(weights_only=True)``: opening a file shared by a colleague
runs no code from it.

A checkpoint that holds its calibration (written when training ends, or added by ``plankton
test``) gives calibrated probabilities, ``softmax(logits / T)``, and with them:

- abundance that survives a change of season: the counts table gives, per class, the fraction of
  the sample by each requested estimator, with a 90% bootstrap interval. ``cc`` counts top-1
  predictions, which is biased once the class fractions differ from the training ones; ``acc``,
  ``pacc`` and ``emq`` correct for that with what the checkpoint measured on its validation split
  (``lightning_modules.common.abundance``);
- rejection: an image whose calibrated confidence is below the threshold chosen on validation is
  reported as ``unknown`` rather than forced into a class;
- an EcoTaxa import table next to the images, so the predictions are validated in EcoTaxa.

A checkpoint written before calibrations existed still classifies with the plain softmax and
counts with ``cc``; the options that need calibration refuse it before any image is read, naming
the command that adds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
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
from datamodules.splits import largest_remainder
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
from lightning_modules.common.abundance import ESTIMATORS, Quantifier, bootstrap_interval
from lightning_modules.common.calibration import (
    Calibration,
    MissingCalibrationError,
    checkpoint_calibrations,
)
from lightning_modules.common.calibration import reject as below_threshold
from lightning_modules.common.module import load_checkpoint
from workflows.ecotaxa import PREFIX, SUFFIX, check_ecotaxa_name, write_ecotaxa_predictions

# The only classes a probe checkpoint may name as its feature source: a file never chooses code.
FEATURE_SOURCES = {
    f"lightning_modules.{cls.__name__}": cls
    for cls in (DiffusionFeatures, EncoderFeatures, PixelFeatures)
}

# A probe, or a method that learns from labels (``per_regime`` in the registry).
Classifier = PlanktonModule
# Decoding failures that make one file unusable without stopping the sample.
_UNREADABLE = (ImageReadError, Image.DecompressionBombError, OSError, ValueError)
# The label of a rejected image, and its row in the counts table.
UNKNOWN = "unknown"
# Coverage of the bootstrap intervals of the class fractions.
INTERVAL_LEVEL = 0.9
# The counts table's columns of each estimator, prefixed with its name (``pacc_fraction``).
ESTIMATE_COLUMNS = ("count", "fraction", "low", "high")


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
    return _classifier(load_checkpoint(path), Path(path))


def _classifier(checkpoint: dict, path: Path) -> tuple[Classifier, ClassifierSettings]:
    """``load_classifier`` on a checkpoint already read, so that its calibration is read from
    the same dictionary."""
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
    """Refuse to write over a folder or (without ``overwrite``) any existing file: a mistyped
    ``--out`` must not replace someone's data."""
    for path in paths:
        if path.is_dir():
            raise ValueError(f"{path} is a folder; name a file with --out")
        if path.exists() and not overwrite:
            raise FileExistsError(
                f"{path} exists; choose another --out or pass --overwrite to replace it"
            )


def abundance_estimators(names: str | Sequence[str]) -> list[str]:
    """The estimators ``names`` ask for (a sequence, or one comma-separated string; ``all`` is
    every one), in the order of ``ESTIMATORS``."""
    if isinstance(names, str):
        names = names.split(",")
    requested = {name.strip().lower() for name in names}
    unknown = sorted(requested - {*ESTIMATORS, "all"})
    if unknown or not requested:
        raise ValueError(
            f"unknown abundance estimator(s) {', '.join(map(repr, unknown)) or '(none given)'}: "
            f"choose from {', '.join(ESTIMATORS)}, or all"
        )
    return [name for name in ESTIMATORS if name in requested or "all" in requested]


def classify_folder(
    checkpoint: str | Path,
    images: str | Path,
    out: str | Path,
    top_k: int = 3,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    abundance: str | Sequence[str] = ("cc",),
    reject: bool = False,
    ecotaxa: bool = False,
    n_boot: int = 200,
) -> dict:
    """Classify every image below ``images`` and write ``out`` (top-k labels per image),
    ``<stem>_counts.csv`` (the abundance table), ``<stem>_skipped.csv`` and, with ``ecotaxa``,
    ``ecotaxa_<stem>.tsv`` in the image folder (an EcoTaxa import table of the predictions, whose
    image paths are relative to that folder).

    ``out`` must be a ``.csv`` path; none of the files may exist unless ``overwrite``. That, the
    options, and the calibration they need are checked before any image is read, so a long sample
    never ends in a refusal.

    Probabilities are calibrated (``softmax(logits / T)``) when the checkpoint holds its
    calibration, else the plain softmax. With ``reject``, an image whose calibrated maximum
    probability is below the checkpoint's rejection threshold is labelled ``unknown`` (column
    ``label`` of ``out``, after the path; its top-k stay for review) and is never counted as a
    class: the estimators read the accepted images only, and the ``unknown`` row of the counts
    table gives the number rejected (its fraction cells are empty). The fractions are then those
    of the images the classifier is confident about, which is what the threshold's validation
    precision holds for.

    The counts table has one row per class (most abundant first by the first estimator), and per
    estimator of ``abundance`` (names from ``ESTIMATORS``, or ``all``) the columns
    ``<name>_count``, ``<name>_fraction``, ``<name>_low`` and ``<name>_high``: low and high bound
    the 90% percentile bootstrap interval of the fraction over ``n_boot`` resamples of the
    sample's images (its sampling noise only). A count is the fraction times the accepted images,
    rounded by largest remainder so that an estimator's counts add up to them; ``cc``'s are the
    top-1 counts exactly. ``cc`` needs no calibration; ``acc``, ``pacc``, ``emq`` and ``reject``
    do. When every image is rejected, fractions are NaN and counts 0.

    A sample often holds a few broken files; they are listed with their reason instead of
    stopping the run. Images are read in batches of ``batch_size``; the class probabilities of
    the whole sample are kept in memory as one ``(N, C)`` float32 array (4 MB for 10,000 images
    of 100 classes), which the estimators and their bootstrap read. For a probe over diffusion
    features, image ``i`` of the sorted listing is noised as image ``i`` of a split is: results
    do not depend on ``batch_size``. ``device`` defaults to the GPU when there is one.

    Returns:
        ``images`` (classified) and ``skipped`` (counts); ``counts`` (``{class: n}``, top-1
        counts of the accepted images, every class, in the table's order); ``abundance``
        (``{estimator: {class: fraction}}``) and ``intervals`` (``{estimator: {class: [low,
        high]}}``); ``temperature`` (None when uncalibrated); ``rejection`` (``threshold``,
        ``precision`` and ``coverage`` on validation, ``rejected``: images labelled unknown;
        None without ``reject``); ``top_k`` (after clamping to the number of classes),
        ``device``, and ``outputs`` (``predictions``, ``counts``, ``skipped`` and, with
        ``ecotaxa``, ``ecotaxa`` paths).

    Raises:
        MissingCalibrationError: an option needs calibration and the checkpoint holds none; the
            message names the command that adds it.
    """
    root = Path(images)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    out = Path(out)
    if out.suffix.lower() != ".csv":
        raise ValueError(f"--out {out} must name a .csv file")
    if top_k < 1 or batch_size < 1 or n_boot < 1:
        raise ValueError(
            f"top_k, batch_size and n_boot must be at least 1, got {top_k}, {batch_size} and "
            f"{n_boot}"
        )
    estimators = abundance_estimators(abundance)
    outputs = {
        "predictions": out,
        "counts": out.with_name(f"{out.stem}_counts.csv"),
        "skipped": out.with_name(f"{out.stem}_skipped.csv"),
    }
    if ecotaxa:
        outputs["ecotaxa"] = check_ecotaxa_name(root / f"{PREFIX}{out.stem}{SUFFIX}")
    check_outputs(list(outputs.values()), overwrite)
    files = image_files(root)
    if not files:
        raise ValueError(
            f"no image files in {root} or its subfolders "
            f"(suffixes {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    saved = load_checkpoint(checkpoint)
    needs = [f"--abundance {name}" for name in estimators if name != "cc"]
    if reject:
        needs.append("--reject")
    calibration = _calibration(saved, checkpoint, needs)
    module, settings = _classifier(saved, Path(checkpoint))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    module.to(device).eval()
    classes = list(module.class_names)
    names, probs, skipped = _probabilities(
        module, settings, calibration, root, files, batch_size, device
    )

    rejected = np.zeros(len(names), dtype=bool)
    if reject:
        rejected = below_threshold(torch.from_numpy(probs), calibration.rejection.threshold).numpy()
    accepted, unknown = probs[~rejected], int(rejected.sum())
    # Counting reads no validation statistics: an uncalibrated checkpoint counts through a
    # quantifier that holds none.
    quantifier = calibration.quantifier if calibration else _counting_quantifier(len(classes))
    estimates = {name: _estimate(quantifier, accepted, name, n_boot) for name in estimators}
    counts = {name: largest_remainder(e[0], len(accepted)) for name, e in estimates.items()}
    first = counts[estimators[0]]
    order = sorted(range(len(classes)), key=lambda i: -first[i])  # ties keep the class order

    out.parent.mkdir(parents=True, exist_ok=True)
    k = min(top_k, len(classes))
    values, ranked = torch.from_numpy(probs).topk(k, dim=-1)
    predicted = ranked[:, 0].numpy()
    labels = [UNKNOWN if r else classes[i] for r, i in zip(rejected, predicted, strict=True)]
    # Only ``reject`` can make the decision differ from label_1: without it the columns stay.
    header = ["path", *["label"] * reject]
    header += [f"{kind}_{i}" for i in range(1, k + 1) for kind in ("label", "prob")]
    rows = []
    for name, label, top_values, top_labels in zip(names, labels, values, ranked, strict=True):
        row = [name] + [label] * reject
        for value, index in zip(top_values.tolist(), top_labels.tolist(), strict=True):
            row += [classes[index], f"{value:.4f}"]
        rows.append(row)
    write_csv_atomic(out, header, rows)

    table = []
    for i in order:
        row = [classes[i]]
        for name in estimators:
            row += [counts[name][i], *(f"{value:.4f}" for value in estimates[name][:, i])]
        table.append(row)
    if reject:
        table.append([UNKNOWN] + [unknown, "", "", ""] * len(estimators))
    columns = [f"{name}_{column}" for name in estimators for column in ESTIMATE_COLUMNS]
    write_csv_atomic(outputs["counts"], ["class", *columns], table)
    write_csv_atomic(outputs["skipped"], ["path", "reason"], skipped)
    if ecotaxa:
        write_ecotaxa_predictions(
            outputs["ecotaxa"],
            names,
            classes,
            probs,
            top_k=k,
            object_ids=_object_ids(names),
            labels=labels if reject else None,
        )

    top1 = np.bincount(predicted[~rejected], minlength=len(classes))
    rejection = {**asdict(calibration.rejection), "rejected": unknown} if reject else None
    return {
        "images": len(names),
        "skipped": len(skipped),
        "counts": {classes[i]: int(top1[i]) for i in order},
        "abundance": {
            name: {classes[i]: float(e[0, i]) for i in order} for name, e in estimates.items()
        },
        "intervals": {
            name: {classes[i]: [float(e[1, i]), float(e[2, i])] for i in order}
            for name, e in estimates.items()
        },
        "temperature": calibration.temperature if calibration else None,
        "rejection": rejection,
        "top_k": k,
        "device": str(device),
        "outputs": {key: str(path) for key, path in outputs.items()},
    }


def _calibration(checkpoint: dict, path: str | Path, needs: list[str]) -> Calibration | None:
    """The calibration of what the checkpoint's ``classify`` returns; None for a checkpoint
    written before calibrations, unless one of the options ``needs`` names requires it."""
    try:
        return checkpoint_calibrations(checkpoint, path)["classify"]
    except MissingCalibrationError as error:
        if needs:
            verb = "needs" if len(needs) == 1 else "need"
            raise MissingCalibrationError(
                f"{' and '.join(needs)} {verb} calibrated probabilities (plain classification "
                f"and cc counts do not): {error}"
            ) from None
        return None


def _probabilities(
    module: Classifier,
    settings: ClassifierSettings,
    calibration: Calibration | None,
    root: Path,
    files: list[Path],
    batch_size: int,
    device: torch.device,
) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """The readable images' paths relative to ``root``, their ``(N, C)`` float32 class
    probabilities, and the unreadable ones with their reason."""
    preprocessing = settings.preprocessing
    view = eval_view(settings.image_size, settings.in_chans)
    names: list[str] = []
    batches: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    for start in range(0, len(files), batch_size):
        arrays = []
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
        indices = torch.arange(len(names) - len(arrays), len(names))
        with torch.no_grad():
            logits = _classify(module, batch, indices).float()
            probabilities = calibration.probabilities(logits) if calibration else logits.softmax(-1)
        batches.append(probabilities.cpu().numpy())
    if not names:
        examples = "; ".join(f"{name} ({reason})" for name, reason in skipped[:3])
        raise ValueError(
            f"no readable image in {root}: all {len(skipped)} image files failed, e.g. {examples}"
        )
    return names, np.concatenate(batches), skipped


def _counting_quantifier(num_classes: int) -> Quantifier:
    identity = np.eye(num_classes)
    return Quantifier(confusion=identity, mean_probs=identity, train_priors=np.ones(num_classes))


def _estimate(quantifier: Quantifier, probs: np.ndarray, method: str, n_boot: int) -> np.ndarray:
    """``(3, C)``: the class fractions of ``probs`` by ``method``, and the lower and upper
    bounds of their bootstrap interval; NaN when every image was rejected."""
    if not len(probs):
        return np.full((3, quantifier.num_classes), np.nan)
    interval = bootstrap_interval(quantifier, probs, method, n_boot, INTERVAL_LEVEL)
    return np.stack([quantifier.estimate(probs, method), *interval])


def _object_ids(names: list[str]) -> list[str]:
    """EcoTaxa object ids unique within the sample: the relative path without its suffix, as
    file stems repeat across subfolders (``night/0001.png``, ``day/0001.png``)."""
    return [PurePosixPath(name).with_suffix("").as_posix().replace("/", "_") for name in names]


def _classify(module: Classifier, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Logits; a probe also takes the indices that key its per-image diffusion noise."""
    if isinstance(module, ProbeModule):
        return module.classify(images, indices)
    return module.classify(images)
