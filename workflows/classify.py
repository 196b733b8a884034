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

Every output set gets a provenance sidecar (``workflows.classify_provenance``); a survey of many
samples in one run is ``workflows.classify_survey``.

A checkpoint written before calibrations existed still classifies with the plain softmax and
counts with ``cc``; the options that need calibration refuse it before any image is read, naming
the command that adds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from datamodules.preprocessing import IMAGE_SUFFIXES, Preprocessing
from lightning_modules import (
    METHODS,
    DiffusionFeatures,
    EncoderFeatures,
    PixelFeatures,
    ProbeModule,
    method_of,
)
from lightning_modules.common.abundance import ESTIMATORS
from lightning_modules.common.calibration import (
    Calibration,
    MissingCalibrationError,
    checkpoint_calibrations,
)
from lightning_modules.common.module import load_checkpoint
from workflows.classify_outputs import ClassifyOutputs, write_outputs
from workflows.classify_provenance import Provenance, command_settings
from workflows.classify_sample import (
    Classifier,
    ClassifierSettings,
    LoadedClassifier,
    Prediction,
    Quantification,
    predict,
    quantify,
)

# The only classes a probe checkpoint may name as its feature source: a file never chooses code.
FEATURE_SOURCES = {
    f"lightning_modules.{cls.__name__}": cls
    for cls in (DiffusionFeatures, EncoderFeatures, PixelFeatures)
}


@dataclass(frozen=True)
class ClassifyResult:
    """What ``classify_folder`` found in a sample, in the counts table's class order.

    Attributes:
        images: the images classified.
        skipped: the unreadable images.
        counts: ``{class: n}``, top-1 counts of the accepted images, every class.
        abundance: ``{estimator: {class: fraction}}``.
        intervals: ``{estimator: {class: [low, high]}}``, the bootstrap intervals.
        temperature: the calibration's temperature; None when uncalibrated.
        rejection: ``threshold``, ``precision`` and ``coverage`` on validation, and
            ``rejected``, the images labelled unknown; None without ``reject``.
        top_k: the labels per image, after clamping to the number of classes.
        device: where the images were classified.
        outputs: the files written.
    """

    images: int
    skipped: int
    counts: dict[str, int]
    abundance: dict[str, dict[str, float]]
    intervals: dict[str, dict[str, list[float]]]
    temperature: float | None
    rejection: dict | None
    top_k: int
    device: str
    outputs: ClassifyOutputs

    @classmethod
    def of(
        cls,
        classifier: LoadedClassifier,
        prediction: Prediction,
        quantification: Quantification,
        outputs: ClassifyOutputs,
    ) -> ClassifyResult:
        """The result of ``prediction`` and ``quantification`` of one sample, written to
        ``outputs``."""
        classes, order = prediction.classes, quantification.order
        estimates, calibration = quantification.estimates, classifier.calibration
        rejection = None
        if quantification.rejected is not None:
            rejection = {**asdict(calibration.rejection), "rejected": quantification.unknown}
        return cls(
            images=len(prediction.names),
            skipped=len(prediction.skipped),
            counts={classes[i]: int(quantification.top1[i]) for i in order},
            abundance={
                name: {classes[i]: float(e[0, i]) for i in order} for name, e in estimates.items()
            },
            intervals={
                name: {classes[i]: [float(e[1, i]), float(e[2, i])] for i in order}
                for name, e in estimates.items()
            },
            temperature=calibration.temperature if calibration else None,
            rejection=rejection,
            top_k=prediction.top_k,
            device=str(classifier.device),
            outputs=outputs,
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
) -> ClassifyResult:
    """Classify every image below ``images`` and write ``out`` (top-k labels per image),
    ``<stem>_counts.csv`` (the abundance table), ``<stem>_skipped.csv``,
    ``<stem>_provenance.json`` (``Provenance``: the checkpoint's sha256, the settings, the time)
    and, with ``ecotaxa``, ``ecotaxa_<stem>.tsv`` in the image folder (an EcoTaxa import table of
    the predictions, whose image paths are relative to that folder).

    ``out`` must be a ``.csv`` path; none of the files may exist unless ``overwrite``. That, the
    options, and the calibration they need are checked before any image is read, so a long sample
    never ends in a refusal.

    Probabilities are calibrated (``softmax(logits / T)``) when the checkpoint holds its
    calibration, else the plain softmax. With ``reject``, an image whose calibrated maximum
    probability is below the checkpoint's rejection threshold is labelled ``unknown`` (column
    ``label`` of ``out``, after the path; its top-k stay for review) and is never counted as a
    class: the estimators read the accepted images only, and the ``unknown`` row of the counts
    table gives the number rejected. The fractions are then those of the images the classifier
    is confident about, which is what the threshold's validation precision holds for.

    The counts table has one row per class (most abundant first by the first estimator), and per
    estimator of ``abundance`` (names from ``ESTIMATORS``, or ``all``) the columns
    ``<name>_count``, ``<name>_fraction``, ``<name>_low`` and ``<name>_high``, the bounds of the
    90% bootstrap interval of the fraction over ``n_boot`` resamples (``quantify``). ``cc`` needs
    no calibration; ``acc``, ``pacc``, ``emq`` and ``reject`` do. When every image is rejected,
    fractions are NaN and counts 0.

    A sample often holds a few broken files; they are listed with their reason instead of
    stopping the run. Images are read in batches of ``batch_size``; the class probabilities of
    the whole sample are kept in memory as one ``(N, C)`` float32 array (4 MB for 10,000 images
    of 100 classes), which the estimators and their bootstrap read. Results do not depend on
    ``batch_size``. ``device`` defaults to the GPU when there is one.

    Raises:
        MissingCalibrationError: an option needs calibration and the checkpoint holds none; the
            message names the command that adds it.
    """
    root = Path(images)
    outputs, estimators = check_options(
        root, Path(out), top_k, batch_size, n_boot, abundance, ecotaxa, overwrite
    )
    files = _sample_images(root)
    classifier = open_classifier(checkpoint, device, calibration_needs(estimators, reject))
    settings = command_settings(top_k, batch_size, estimators, reject, n_boot, images=str(root))
    provenance = Provenance.of(checkpoint, classifier, settings)
    prediction = predict(classifier, root, files, batch_size, top_k)
    quantification = quantify(prediction, classifier.calibration, estimators, reject, n_boot)
    write_outputs(outputs, prediction, quantification, provenance)
    return ClassifyResult.of(classifier, prediction, quantification, outputs)


def check_options(
    root: Path,
    out: Path,
    top_k: int,
    batch_size: int,
    n_boot: int,
    abundance: str | Sequence[str],
    ecotaxa: bool,
    overwrite: bool,
) -> tuple[ClassifyOutputs, list[str]]:
    """The outputs of a sample in ``root`` written to ``out``, and the estimators ``abundance``
    names, once every option is checked and no output would be written over."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    outputs = ClassifyOutputs.of(out, root, ecotaxa)
    estimators = check_settings(top_k, batch_size, n_boot, abundance)
    outputs.check(overwrite)
    return outputs, estimators


def check_settings(
    top_k: int, batch_size: int, n_boot: int, abundance: str | Sequence[str]
) -> list[str]:
    """The estimators ``abundance`` names, once the numeric settings are checked."""
    if top_k < 1 or batch_size < 1 or n_boot < 1:
        raise ValueError(
            f"top_k, batch_size and n_boot must be at least 1, got {top_k}, {batch_size} and "
            f"{n_boot}"
        )
    return abundance_estimators(abundance)


def calibration_needs(estimators: list[str], reject: bool) -> list[str]:
    """The options given that need a calibrated checkpoint (for ``open_classifier``)."""
    needs = [f"--abundance {name}" for name in estimators if name != "cc"]
    return [*needs, "--reject"] if reject else needs


def open_classifier(
    checkpoint: str | Path, device: str | torch.device | None, needs: list[str]
) -> LoadedClassifier:
    """The classifier of ``checkpoint`` (``load_classifier``) with its calibration, in eval mode
    on ``device`` (default the GPU when there is one). ``needs`` are the options that require
    calibration: a checkpoint without one is refused when any is given."""
    saved = load_checkpoint(checkpoint)
    calibration = _calibration(saved, checkpoint, needs)
    module, settings = _classifier(saved, Path(checkpoint))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    method = method_of(saved["state_dict"])
    return LoadedClassifier(module.to(device).eval(), settings, calibration, device, method)


def _sample_images(root: Path) -> list[Path]:
    """``image_files(root)``; an error naming the suffixes looked for when there is none."""
    files = image_files(root)
    if not files:
        raise ValueError(
            f"no image files in {root} or its subfolders "
            f"(suffixes {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    return files


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
