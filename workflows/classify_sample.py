"""One sample through a loaded classifier: predict its images, then quantify its classes.

Both steps read plain inputs (image paths, a probability table) and return plain records, so a
run over many samples loads the classifier once and calls them per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from datamodules.preprocessing import ImageReadError, Preprocessing, load_preprocessed
from datamodules.splits import largest_remainder
from datamodules.views import eval_view
from lightning_modules import PlanktonModule, ProbeModule
from lightning_modules.common.abundance import Quantifier, bootstrap_interval
from lightning_modules.common.calibration import Calibration
from lightning_modules.common.calibration import reject as below_threshold

# A probe, or a method that learns from labels (``per_regime`` in the registry).
Classifier = PlanktonModule
# Decoding failures that make one file unusable without stopping the sample.
_UNREADABLE = (ImageReadError, Image.DecompressionBombError, OSError, ValueError)
# Coverage of the bootstrap intervals of the class fractions.
INTERVAL_LEVEL = 0.9


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


@dataclass(frozen=True)
class LoadedClassifier:
    """A checkpoint's classifier ready for samples: the module in eval mode on ``device``, the
    preprocessing its training images had, its calibration (None for a checkpoint written
    before calibrations: plain softmax, counting only), and the registered method its state
    dict belongs to (``method_of``; None when it matches none), recorded in the provenance."""

    module: Classifier
    settings: ClassifierSettings
    calibration: Calibration | None
    device: torch.device
    method: str | None = None

    @property
    def classes(self) -> list[str]:
        return list(self.module.class_names)


@dataclass(frozen=True)
class Prediction:
    """A sample's readable images and what the classifier says of them.

    Attributes:
        classes: the classifier's classes, in the order of the probability columns.
        names: the readable images' paths relative to the sample's folder, ``/``-separated.
        probabilities: ``(N, C)`` float32 class probabilities, calibrated when the classifier is.
        top_probabilities: ``(N, k)`` the ``k`` highest of each row, highest first.
        top_classes: ``(N, k)`` their class indices.
        skipped: the unreadable images, with their reason.
    """

    classes: list[str]
    names: list[str]
    probabilities: np.ndarray
    top_probabilities: torch.Tensor
    top_classes: torch.Tensor
    skipped: list[tuple[str, str]]

    @property
    def top_k(self) -> int:
        return self.top_classes.shape[1]

    @property
    def predicted(self) -> np.ndarray:
        """``(N,)`` the top-1 class index of each image."""
        return self.top_classes[:, 0].numpy()


@dataclass(frozen=True)
class Quantification:
    """A sample's class fractions by each estimator, over the images not rejected.

    Attributes:
        estimators: the estimators' names, the first one ordering the counts table.
        rejected: ``(N,)`` whether each image is reported ``unknown``; None without rejection.
        estimates: per estimator, ``(3, C)``: the fractions and the low and high bounds of
            their bootstrap interval; NaN when every image was rejected.
        counts: per estimator, ``(C,)`` the fractions as whole counts of the accepted images.
        top1: ``(C,)`` the top-1 counts of the accepted images.
        order: the class indices, most abundant first by the first estimator (ties keep the
            class order).
    """

    estimators: list[str]
    rejected: np.ndarray | None
    estimates: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    top1: np.ndarray
    order: list[int]

    @property
    def unknown(self) -> int:
        """The number of images rejected."""
        return 0 if self.rejected is None else int(self.rejected.sum())


def predict(
    classifier: LoadedClassifier, root: Path, files: list[Path], batch_size: int, top_k: int
) -> Prediction:
    """The class probabilities of ``files`` (below ``root``), read in batches of ``batch_size``
    through the datamodule's decoding, preprocessing and evaluation view, and their ``top_k``
    (clamped to the number of classes). For a probe over diffusion features, image ``i`` of
    ``files`` is noised as image ``i`` of a split is: results do not depend on ``batch_size``.

    Raises:
        ValueError: no file is readable; the message gives the first reasons.
    """
    prediction = read_sample(classifier, root, files, batch_size, top_k)
    if not prediction.names:
        examples = "; ".join(f"{name} ({reason})" for name, reason in prediction.skipped[:3])
        raise ValueError(
            f"no readable image in {root}: all {len(prediction.skipped)} image files failed, "
            f"e.g. {examples}"
        )
    return prediction


def read_sample(
    classifier: LoadedClassifier, root: Path, files: list[Path], batch_size: int, top_k: int
) -> Prediction:
    """``predict``, but a sample without a readable image gives a prediction of no rows (its
    files all in ``skipped``): in a survey such a sample is reported, not an error."""
    preprocessing = classifier.settings.preprocessing
    view = eval_view(classifier.settings.image_size, classifier.settings.in_chans)
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
        batch = view(torch.from_numpy(np.stack(arrays))).to(classifier.device)
        indices = torch.arange(len(names) - len(arrays), len(names))
        batches.append(_probabilities(classifier, batch, indices).cpu().numpy())
    classes = classifier.classes
    probabilities = (
        np.concatenate(batches) if batches else np.empty((0, len(classes)), dtype=np.float32)
    )
    values, ranked = torch.from_numpy(probabilities).topk(min(top_k, len(classes)), dim=-1)
    return Prediction(classes, names, probabilities, values, ranked, skipped)


def quantify(
    prediction: Prediction,
    calibration: Calibration | None,
    estimators: list[str],
    reject: bool,
    n_boot: int,
) -> Quantification:
    """The class fractions of ``prediction`` by each of ``estimators`` (names from
    ``ESTIMATORS``), with their 90% percentile bootstrap interval over ``n_boot`` resamples of the
    sample's images (its sampling noise only). With ``reject``, an image whose calibrated maximum
    probability is below the calibration's rejection threshold is left out of every estimate.

    A count is the fraction times the accepted images, rounded by largest remainder so that an
    estimator's counts add up to them; ``cc``'s are the top-1 counts exactly. ``cc`` reads no
    validation statistics, so ``calibration`` may be None when ``reject`` is off and ``cc`` is
    the only estimator.
    """
    probabilities = prediction.probabilities
    rejected = None
    if reject:
        threshold = calibration.rejection.threshold
        rejected = below_threshold(torch.from_numpy(probabilities), threshold).numpy()
    accepted_mask = np.ones(len(probabilities), dtype=bool) if rejected is None else ~rejected
    accepted = probabilities[accepted_mask]
    num_classes = len(prediction.classes)
    quantifier = calibration.quantifier if calibration else _counting_quantifier(num_classes)
    estimates = {name: _estimate(quantifier, accepted, name, n_boot) for name in estimators}
    counts = {name: largest_remainder(e[0], len(accepted)) for name, e in estimates.items()}
    first = counts[estimators[0]]
    order = sorted(range(num_classes), key=lambda i: -first[i])  # ties keep the class order
    top1 = np.bincount(prediction.predicted[accepted_mask], minlength=num_classes)
    return Quantification(estimators, rejected, estimates, counts, top1, order)


def _probabilities(
    classifier: LoadedClassifier, images: torch.Tensor, indices: torch.Tensor
) -> torch.Tensor:
    """Calibrated probabilities, or the plain softmax for an uncalibrated classifier; a probe
    also takes the indices that key its per-image diffusion noise."""
    module, calibration = classifier.module, classifier.calibration
    with torch.no_grad():
        if isinstance(module, ProbeModule):
            logits = module.classify(images, indices).float()
        else:
            logits = module.classify(images).float()
        return calibration.probabilities(logits) if calibration else logits.softmax(-1)


def _counting_quantifier(num_classes: int) -> Quantifier:
    """A quantifier that holds no validation statistics: enough for counting (``cc``)."""
    identity = np.eye(num_classes)
    return Quantifier(confusion=identity, mean_probs=identity, train_priors=np.ones(num_classes))


def _estimate(quantifier: Quantifier, probs: np.ndarray, method: str, n_boot: int) -> np.ndarray:
    """``(3, C)``: the class fractions of ``probs`` by ``method``, and the lower and upper
    bounds of their bootstrap interval; NaN when every image was rejected."""
    if not len(probs):
        return np.full((3, quantifier.num_classes), np.nan)
    interval = bootstrap_interval(quantifier, probs, method, n_boot, INTERVAL_LEVEL)
    return np.stack([quantifier.estimate(probs, method), *interval])
