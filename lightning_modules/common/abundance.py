"""Class abundance of a new sample under prior (label) shift: counts that survive a change of
season.

Counting a classifier's predictions (``cc``) is biased whenever the class fractions of the new
sample differ from those it was trained and validated on: errors from an abundant class flood a
rare one. If only the priors change and each class still looks the same (``p(x | y)`` fixed),
the classifier's behaviour per true class, measured once on the validation split, lets the
fractions be recovered (``acc``, ``pacc``) or re-estimated by EM (``emq``). Estimator names
follow QuaPy (Moreo, Esuli & Sebastiani 2021).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls

ESTIMATORS = ("cc", "acc", "pacc", "emq")
# Those that read the misclassification rates measured on validation.
RATE_ESTIMATORS = ("acc", "pacc")

# Weight of the sum-to-one row appended to the adjustment's least-squares system: large enough
# that the solution lies on the simplex to ~1e-10 before the final normalisation.
_SIMPLEX_WEIGHT = 1e4
_EM_TOLERANCE = 1e-6
_EM_MAX_ITERATIONS = 1000
# Samples the planted check averages over (``planted_shift_errors``).
PLANTED_DRAWS = 50


def _as_probs(probs: np.ndarray, num_classes: int, name: str) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != num_classes:
        raise ValueError(
            f"{name} must have shape (N, {num_classes}) (one row of class probabilities per "
            f"image), got {probs.shape}"
        )
    if probs.shape[0] == 0:
        raise ValueError(f"{name} is empty: at least one image is needed")
    return probs


def _simplex_least_squares(matrix: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """``argmin ||matrix^T p - observed||`` over the probability simplex.

    Solved as non-negative least squares with ``sum(p) = 1`` as one heavily weighted extra
    equation, then normalised: deterministic, with no iteration tolerance, and the best fit on
    the simplex rather than the unconstrained inverse clipped afterwards, which shifts every
    other class when one comes out negative.
    """
    num_classes = len(observed)
    system = np.vstack([matrix.T, np.full((1, num_classes), _SIMPLEX_WEIGHT)])
    target = np.append(observed, _SIMPLEX_WEIGHT)
    solution, _ = nnls(system, target)
    return solution / solution.sum()


@dataclass(eq=False)
class Quantifier:
    """What quantification needs from the validation split, fitted once and stored with a
    model.

    Classes absent from the validation split get the identity row in ``confusion`` and
    ``mean_probs`` (as QuaPy does): with no evidence of how the classifier errs on them, they
    are assumed recognised perfectly, so their estimate falls back to counting.

    Attributes:
        confusion: ``(C, C)``; row ``i`` is the rate of predicting each class (argmax) given
            true class ``i``. Rows sum to 1.
        mean_probs: ``(C, C)``; row ``i`` is the mean predicted probability vector of the
            validation images of true class ``i``. Rows sum to 1.
        train_priors: ``(C,)`` class fractions of the training split the classifier's
            posteriors reflect; all positive, summing to 1.
    """

    confusion: np.ndarray
    mean_probs: np.ndarray
    train_priors: np.ndarray

    def __post_init__(self) -> None:
        self.train_priors = np.asarray(self.train_priors, dtype=np.float64)
        if self.train_priors.ndim != 1 or len(self.train_priors) < 2:
            raise ValueError(
                f"train_priors must have shape (C,) with C >= 2, got {self.train_priors.shape}"
            )
        if np.any(self.train_priors <= 0):
            # EMQ divides by them; a class the classifier never saw cannot be quantified.
            raise ValueError("train_priors must all be positive")
        self.train_priors = self.train_priors / self.train_priors.sum()
        num_classes = len(self.train_priors)
        for name in ("confusion", "mean_probs"):
            matrix = np.asarray(getattr(self, name), dtype=np.float64)
            if matrix.shape != (num_classes, num_classes):
                raise ValueError(
                    f"{name} must have shape ({num_classes}, {num_classes}), got {matrix.shape}"
                )
            setattr(self, name, matrix)

    @property
    def num_classes(self) -> int:
        return len(self.train_priors)

    @classmethod
    def fit(
        cls, val_probs: np.ndarray, val_labels: np.ndarray, train_priors: np.ndarray
    ) -> Quantifier:
        """Measure the classifier per true class on the validation split.

        Args:
            val_probs: ``(N, C)`` (calibrated) class probabilities of the validation images.
            val_labels: ``(N,)`` their true class indices.
            train_priors: ``(C,)`` training class fractions (or counts; they are normalised).
        """
        train_priors = np.asarray(train_priors, dtype=np.float64)
        if train_priors.ndim != 1:
            raise ValueError(f"train_priors must have shape (C,), got {train_priors.shape}")
        num_classes = len(train_priors)
        val_probs = _as_probs(val_probs, num_classes, "val_probs")
        val_labels = np.asarray(val_labels)
        if val_labels.shape != (len(val_probs),):
            raise ValueError(
                f"val_labels must have shape ({len(val_probs)},) to match val_probs, "
                f"got {val_labels.shape}"
            )
        if not np.issubdtype(val_labels.dtype, np.integer):
            raise ValueError(f"val_labels must be integer class indices, got {val_labels.dtype}")
        if val_labels.min() < 0 or val_labels.max() >= num_classes:
            raise ValueError(f"val_labels must be class indices in [0, {num_classes})")
        val_labels = val_labels.astype(np.int64)
        predicted = val_probs.argmax(axis=1)
        counts = np.bincount(
            val_labels * num_classes + predicted, minlength=num_classes**2
        ).reshape(num_classes, num_classes)
        prob_sums = np.zeros((num_classes, num_classes))
        np.add.at(prob_sums, val_labels, val_probs)
        per_class = counts.sum(axis=1, keepdims=True)
        present = per_class[:, 0] > 0
        identity = np.eye(num_classes)
        confusion = np.where(present[:, None], counts / np.maximum(per_class, 1), identity)
        mean_probs = np.where(present[:, None], prob_sums / np.maximum(per_class, 1), identity)
        return cls(confusion=confusion, mean_probs=mean_probs, train_priors=train_priors)

    def estimate(self, probs: np.ndarray, method: str) -> np.ndarray:
        """Class fractions of the sample ``probs`` (``(N, C)``), non-negative and summing to 1.

        - ``cc``: fraction of argmax predictions per class (biased under prior shift).
        - ``acc``: adjusted classify and count (Forman 2008): solve ``confusion^T p = cc``.
        - ``pacc``: probabilistic ACC (Bella et al. 2010): solve ``mean_probs^T p = mean(probs)``.
        - ``emq``: EM re-estimation of the priors (Saerens, Latinne & Decaestecker 2002);
          assumes ``probs`` are calibrated posteriors under ``train_priors``.

        ACC and PACC are solved as least squares on the probability simplex (see
        ``_simplex_least_squares``) rather than by inversion, so a singular or noisy matrix
        still gives valid fractions.
        """
        probs = _as_probs(probs, self.num_classes, "probs")
        if method == "cc":
            return self._classify_and_count(probs)
        if method == "acc":
            return _simplex_least_squares(self.confusion, self._classify_and_count(probs))
        if method == "pacc":
            return _simplex_least_squares(self.mean_probs, probs.mean(axis=0))
        if method == "emq":
            return self._expectation_maximisation(probs)
        raise ValueError(f"unknown method {method!r}: expected one of {ESTIMATORS}")

    def _classify_and_count(self, probs: np.ndarray) -> np.ndarray:
        counts = np.bincount(probs.argmax(axis=1), minlength=self.num_classes)
        return counts / counts.sum()

    def _expectation_maximisation(self, probs: np.ndarray) -> np.ndarray:
        priors = self.train_priors.copy()
        for _ in range(_EM_MAX_ITERATIONS):
            # Bayes' rule with the new priors: the likelihoods p(x | y) are unchanged.
            posteriors = probs * (priors / self.train_priors)
            posteriors /= np.maximum(posteriors.sum(axis=1, keepdims=True), np.finfo(float).tiny)
            updated = posteriors.mean(axis=0)
            updated /= updated.sum()
            converged = np.abs(updated - priors).max() < _EM_TOLERANCE
            priors = updated
            if converged:
                break
        return priors

    def to_dict(self) -> dict[str, list]:
        """Plain lists of floats, loadable with ``torch.load(weights_only=True)``; floats
        round-trip exactly."""
        return {
            "confusion": self.confusion.tolist(),
            "mean_probs": self.mean_probs.tolist(),
            "train_priors": self.train_priors.tolist(),
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, list]) -> Quantifier:
        """The quantifier ``to_dict`` described."""
        return cls(
            confusion=np.asarray(state["confusion"], dtype=np.float64),
            mean_probs=np.asarray(state["mean_probs"], dtype=np.float64),
            train_priors=np.asarray(state["train_priors"], dtype=np.float64),
        )


def bootstrap_interval(
    quantifier: Quantifier,
    probs: np.ndarray,
    method: str,
    n_boot: int = 200,
    level: float = 0.9,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class percentile bootstrap interval of ``quantifier.estimate(probs, method)``.

    Resamples the sample's images with replacement (Efron & Tibshirani 1993), so it covers the
    sampling noise of the sample only, not the error of the validation-fitted quantifier nor a
    violated prior-shift assumption.

    Returns:
        ``(lower, upper)``, each ``(C,)``.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    probs = _as_probs(probs, quantifier.num_classes, "probs")
    rng = np.random.default_rng(seed)
    estimates = np.stack(
        [
            quantifier.estimate(probs[rng.integers(0, len(probs), len(probs))], method)
            for _ in range(n_boot)
        ]
    )
    tail = (1.0 - level) / 2.0
    return np.quantile(estimates, tail, axis=0), np.quantile(estimates, 1.0 - tail, axis=0)


def half_l1(true_fractions: np.ndarray, estimated: np.ndarray) -> float:
    """``0.5 * sum |p - q|`` (total variation distance), in [0, 1]: the smallest share of the
    sample that would have to change class to turn one set of fractions into the other."""
    true_fractions = np.asarray(true_fractions, dtype=np.float64)
    estimated = np.asarray(estimated, dtype=np.float64)
    if true_fractions.shape != estimated.shape or true_fractions.ndim != 1:
        raise ValueError(
            f"expected two (C,) fraction vectors of the same shape, got {true_fractions.shape} "
            f"and {estimated.shape}"
        )
    return 0.5 * float(np.abs(true_fractions - estimated).sum())


def planted_shift_errors(
    quantifier: Quantifier,
    probs: np.ndarray,
    labels: np.ndarray,
    class_counts: np.ndarray,
    draws: int = PLANTED_DRAWS,
    seed: int = 0,
) -> dict[str, object]:
    """Each estimator's mean error (half L1) on samples of in-distribution images drawn, per
    class and with replacement, to ``class_counts``: a shifted set's class mix planted on images
    that look like the validation ones, so that only the priors change.

    Beside the error on the shifted set itself, it tells three reasons a correction can fail
    apart:

    - one that succeeds here but not on the set is defeated by the set's change of appearance;
    - one that fails here with the quantifier's (validation) rates but succeeds with the rates of
      the drawn images themselves (``exact_rates``: ACC's and PACC's errors when the rates are
      exact for these samples) is limited by the validation split's size;
    - one that fails even with exact rates cannot beat counting at this sample size: inverting
      the rates of classes the classifier confuses amplifies the sample's own noise more than
      it removes bias.

    Classes the images lack are left out of the draw (counted in ``missing``).

    Args:
        probs: ``(N, C)`` calibrated probabilities of labelled in-distribution images (the test
            split), not those the quantifier was fitted on.
        labels: ``(N,)`` their classes.
        class_counts: ``(C,)`` images per class of the planted sample (rounded).
    """
    probs = _as_probs(probs, quantifier.num_classes, "probs")
    labels = np.asarray(labels, dtype=np.int64)
    class_counts = np.rint(np.asarray(class_counts, dtype=np.float64)).astype(np.int64)
    members = [np.flatnonzero(labels == c) for c in range(quantifier.num_classes)]
    drawn = [(m, n) for m, n in zip(members, class_counts, strict=True) if n and len(m)]
    if not drawn:
        raise ValueError("no class of class_counts has an image to draw from")
    # Every draw's images per class behave, in expectation, as these images do.
    exact = Quantifier.fit(probs, labels, quantifier.train_priors)
    rng = np.random.default_rng(seed)
    errors: dict[str, list[float]] = {method: [] for method in ESTIMATORS}
    exact_errors: dict[str, list[float]] = {method: [] for method in RATE_ESTIMATORS}
    for _ in range(draws):
        sample = np.concatenate([rng.choice(m, n) for m, n in drawn])
        true = np.bincount(labels[sample], minlength=quantifier.num_classes) / len(sample)
        for method in ESTIMATORS:
            errors[method].append(half_l1(true, quantifier.estimate(probs[sample], method)))
        for method in RATE_ESTIMATORS:
            exact_errors[method].append(half_l1(true, exact.estimate(probs[sample], method)))
    missing = int(sum(n for m, n in zip(members, class_counts, strict=True) if n and not len(m)))
    return {
        **{method: float(np.mean(e)) for method, e in errors.items()},
        "exact_rates": {method: float(np.mean(e)) for method, e in exact_errors.items()},
        "missing": missing,
    }


def abundance_errors(quantifier: Quantifier, probs: np.ndarray, labels: np.ndarray) -> dict:
    """Every estimator against the true class fractions of a labelled set (an experiment's
    out-of-distribution sets): ``images``, ``true`` fractions, ``estimates`` and ``error`` (half
    L1) per estimator, as plain values."""
    labels = np.asarray(labels, dtype=np.int64)
    true = np.bincount(labels, minlength=quantifier.num_classes) / max(len(labels), 1)
    estimates = {method: quantifier.estimate(probs, method) for method in ESTIMATORS}
    return {
        "images": len(labels),
        "true": true.tolist(),
        "estimates": {method: fractions.tolist() for method, fractions in estimates.items()},
        "error": {method: half_l1(true, fractions) for method, fractions in estimates.items()},
    }
