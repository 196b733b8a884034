"""Class abundance under prior shift, on a planted classifier whose behaviour per true class is
fixed while the class fractions change between validation and a new sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_modules.common.abundance import (
    ESTIMATORS,
    Quantifier,
    bootstrap_interval,
    half_l1,
    planted_shift_errors,
)

# Four Gaussian classes on the corners of a square (about 80% accuracy). The classifier's
# probabilities are the exact Bayes posteriors under the training priors: calibrated, as EMQ
# assumes, and with a class-conditional distribution that does not depend on the priors, as
# ACC and PACC assume.
MEANS = 2.5 * np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
TRAIN_PRIORS = np.array([0.4, 0.3, 0.2, 0.1])
SHIFTED_PRIORS = np.array([0.1, 0.15, 0.25, 0.5])  # the "new season": rare classes now abundant

# Over 30 seeds of this setting the worst errors were ACC 0.045, PACC 0.027, EMQ 0.019, and
# the smallest CC error 0.136.
ADJUSTED_TOLERANCE = 0.05  # half-L1 of ACC, PACC and EMQ on 4000 images
CC_MARGIN = 2.0  # CC's half-L1 must exceed every adjusted estimator's by this factor


def planted_sample(
    rng: np.random.Generator, priors: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images with labels drawn from ``priors`` and the planted classifier's
    probabilities for them."""
    labels = rng.choice(len(priors), size=n, p=priors)
    features = MEANS[labels] + rng.normal(size=(n, 2))
    log_joint = -0.5 * ((features[:, None, :] - MEANS[None]) ** 2).sum(-1) + np.log(TRAIN_PRIORS)
    probs = np.exp(log_joint - log_joint.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True), labels


def fractions(labels: np.ndarray) -> np.ndarray:
    return np.bincount(labels, minlength=len(TRAIN_PRIORS)) / len(labels)


@pytest.fixture(scope="module")
def quantifier() -> Quantifier:
    val_probs, val_labels = planted_sample(np.random.default_rng(0), TRAIN_PRIORS, 10_000)
    return Quantifier.fit(val_probs, val_labels, TRAIN_PRIORS)


def test_adjusted_estimators_recover_shifted_fractions_that_counting_misses(quantifier):
    probs, labels = planted_sample(np.random.default_rng(1), SHIFTED_PRIORS, 4000)
    truth = fractions(labels)

    errors = {}
    for method in ESTIMATORS:
        estimate = quantifier.estimate(probs, method)
        assert estimate.shape == truth.shape
        assert np.all(estimate >= 0)
        assert estimate.sum() == pytest.approx(1.0)
        errors[method] = half_l1(truth, estimate)

    for method in ("acc", "pacc", "emq"):
        assert errors[method] <= ADJUSTED_TOLERANCE, errors
        assert errors["cc"] > CC_MARGIN * errors[method], errors


def test_planted_shift_on_in_distribution_images_shows_what_the_corrections_can_do(quantifier):
    # Held-out images at the training mix (a pool large enough that drawing the rare classes
    # five times over adds little noise), drawn to the shifted mix: only the priors change.
    # Over seeds 6-13 the worst errors were ACC 0.029, PACC 0.018, EMQ 0.013, CC at least 0.146.
    probs, labels = planted_sample(np.random.default_rng(6), TRAIN_PRIORS, 20_000)
    shifted = planted_shift_errors(quantifier, probs, labels, SHIFTED_PRIORS * 4000, draws=5)
    unshifted = planted_shift_errors(quantifier, probs, labels, TRAIN_PRIORS * 4000, draws=5)

    assert shifted["missing"] == 0
    for method in ("acc", "pacc", "emq"):
        assert shifted[method] <= ADJUSTED_TOLERANCE, shifted
        assert shifted["cc"] > CC_MARGIN * shifted[method], shifted
    # At the training mix there is nothing to correct, and counting is near exact.
    assert unshifted["cc"] < shifted["cc"] / CC_MARGIN, unshifted


def test_planted_shift_counts_the_classes_it_cannot_draw(quantifier):
    probs, labels = planted_sample(np.random.default_rng(7), TRAIN_PRIORS, 1000)
    kept = labels != 3
    counts = np.array([10, 20, 30, 40])

    errors = planted_shift_errors(quantifier, probs[kept], labels[kept], counts, draws=3)

    assert errors["missing"] == 40
    assert set(errors) == {*ESTIMATORS, "missing"}
    with pytest.raises(ValueError, match="no class"):
        planted_shift_errors(quantifier, probs[kept], labels[kept], np.array([0, 0, 0, 5]))


def test_fitted_quantifier_describes_the_classifier_per_true_class(quantifier):
    np.testing.assert_allclose(quantifier.confusion.sum(axis=1), 1.0)
    np.testing.assert_allclose(quantifier.mean_probs.sum(axis=1), 1.0)
    # A classifier better than chance: each class is predicted as itself most often.
    assert np.all(quantifier.confusion.argmax(axis=1) == np.arange(len(TRAIN_PRIORS)))
    np.testing.assert_allclose(quantifier.train_priors, TRAIN_PRIORS)


def test_class_absent_from_validation_gets_identity_rows():
    probs, labels = planted_sample(np.random.default_rng(2), TRAIN_PRIORS, 2000)
    kept = labels != 3
    fitted = Quantifier.fit(probs[kept], labels[kept], TRAIN_PRIORS)

    np.testing.assert_array_equal(fitted.confusion[3], np.eye(4)[3])
    np.testing.assert_array_equal(fitted.mean_probs[3], np.eye(4)[3])
    for method in ESTIMATORS:
        estimate = fitted.estimate(probs, method)
        assert np.all(estimate >= 0) and estimate.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("method", ["acc", "pacc"])
def test_bootstrap_interval_covers_the_true_fraction_in_most_samples(quantifier, method):
    rng = np.random.default_rng(3)
    covered = []
    for trial in range(20):
        probs, labels = planted_sample(rng, SHIFTED_PRIORS, 1000)
        lower, upper = bootstrap_interval(quantifier, probs, method, n_boot=100, seed=trial)
        assert np.all(lower <= upper)
        truth = fractions(labels)
        covered.extend((lower <= truth) & (truth <= upper))
    # Nominal 90%; at least 75% of the 80 class x sample pairs must be covered.
    assert np.mean(covered) >= 0.75


def test_dict_round_trip_through_a_weights_only_checkpoint(quantifier, tmp_path):
    state = quantifier.to_dict()
    torch.save({"quantifier": state}, tmp_path / "model.ckpt")
    loaded = torch.load(tmp_path / "model.ckpt", weights_only=True)["quantifier"]
    restored = Quantifier.from_dict(loaded)

    assert loaded == state
    probs, _ = planted_sample(np.random.default_rng(4), SHIFTED_PRIORS, 500)
    for method in ESTIMATORS:
        np.testing.assert_array_equal(
            restored.estimate(probs, method), quantifier.estimate(probs, method)
        )


def test_bad_inputs_are_refused_with_the_expected_shape(quantifier):
    probs, labels = planted_sample(np.random.default_rng(5), TRAIN_PRIORS, 50)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        quantifier.estimate(probs[:, :3], "pacc")
    with pytest.raises(ValueError, match=r"\(50,\)"):
        Quantifier.fit(probs, labels[:49], TRAIN_PRIORS)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        Quantifier.fit(probs, labels, TRAIN_PRIORS[:3])
    with pytest.raises(ValueError, match=r"\(4, 4\)"):
        Quantifier.from_dict({**quantifier.to_dict(), "confusion": [[1.0, 0.0], [0.0, 1.0]]})
    with pytest.raises(ValueError, match="emq"):
        quantifier.estimate(probs, "hdy")
    with pytest.raises(ValueError, match=r"\(C,\)"):
        half_l1(np.ones(4) / 4, np.ones((1, 4)) / 4)
