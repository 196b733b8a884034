"""Temperature scaling, calibration error and the rejection threshold on planted classifiers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_modules.common.calibration import (
    TEMPERATURE_RANGE,
    RejectionThreshold,
    calibrate,
    choose_rejection_threshold,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reject,
)

OVERCONFIDENCE = 4.0


def planted_logits(seed: int, n: int = 4000, classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrated logits (log Bayes posteriors of Gaussian classes with equal priors, so that
    their softmax is the true probability of each class) and the labels drawn with them."""
    generator = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, 8, generator=generator) * 0.8
    labels = torch.randint(0, classes, (n,), generator=generator)
    features = means[labels] + torch.randn(n, 8, generator=generator)
    return -0.5 * torch.cdist(features, means) ** 2, labels


def test_temperature_undoes_overconfidence_on_held_out_images():
    logits, labels = planted_logits(seed=0)
    overconfident = OVERCONFIDENCE * logits
    half = len(labels) // 2
    fit, held_out = slice(None, half), slice(half, None)

    temperature = fit_temperature(overconfident[fit], labels[fit])

    # The logits were sharpened 4x, so the temperature that undoes it is about 4.
    assert temperature > 1
    assert abs(temperature - OVERCONFIDENCE) < 0.5
    before = negative_log_likelihood(overconfident[held_out], labels[held_out])
    after = negative_log_likelihood(overconfident[held_out], labels[held_out], temperature)
    assert after < before
    ece_before = expected_calibration_error(
        calibrate(overconfident[held_out], 1.0), labels[held_out]
    )
    ece_after = expected_calibration_error(
        calibrate(overconfident[held_out], temperature), labels[held_out]
    )
    assert ece_after < ece_before / 2
    assert torch.equal(
        calibrate(overconfident, temperature).argmax(dim=1), overconfident.argmax(dim=1)
    )


def test_expected_calibration_error_matches_a_direct_binned_computation():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(3), size=200)
    labels = rng.integers(0, 3, size=200)
    bins = 5

    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    expected = sum(
        np.mean(which == b) * abs(correct[which == b].mean() - confidence[which == b].mean())
        for b in range(bins)
        if np.any(which == b)
    )

    measured = expected_calibration_error(torch.tensor(probs), torch.tensor(labels), bins=bins)
    assert measured == pytest.approx(expected, abs=1e-6)


def _precision_at(
    confidence: torch.Tensor, correct: torch.Tensor, thresholds: torch.Tensor
) -> torch.Tensor:
    """Accuracy of the images accepted at each threshold, all thresholds at once."""
    accepted = confidence[None, :] >= thresholds[:, None]
    return (accepted & correct[None, :]).sum(dim=1) / accepted.sum(dim=1)


def test_rejection_threshold_keeps_the_most_images_that_reach_the_target():
    logits, labels = planted_logits(seed=0)
    probs = calibrate(logits, 1.0)
    confidence, predicted = probs.max(dim=1)
    correct = predicted == labels
    target = 0.9
    assert correct.double().mean() < target  # so the threshold has work to do

    chosen = choose_rejection_threshold(probs, labels, target)

    assert isinstance(chosen, RejectionThreshold)
    assert chosen.target_precision == target
    assert chosen.precision >= target
    assert 0 < chosen.coverage < 1
    rejected = reject(probs, chosen.threshold)
    assert chosen.coverage == pytest.approx(1 - rejected.double().mean().item())
    assert chosen.precision == pytest.approx(correct[~rejected].double().mean().item())
    # Maximal coverage: every lower candidate threshold misses the target.
    lower = torch.unique(confidence[confidence < chosen.threshold])
    assert len(lower) > 0
    assert (_precision_at(confidence, correct, lower) < target).all()


def test_rejection_threshold_is_zero_when_every_image_qualifies():
    logits, labels = planted_logits(seed=0)
    probs = calibrate(logits, 1.0)
    accuracy = (probs.argmax(dim=1) == labels).double().mean().item()

    chosen = choose_rejection_threshold(probs, labels, target_precision=accuracy - 0.01)

    assert chosen.threshold == 0.0
    assert chosen.coverage == 1.0
    assert not reject(probs, chosen.threshold).any()


def test_unreachable_target_returns_the_most_precise_threshold_below_target():
    generator = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(300, 4, generator=generator), dim=1)
    labels = torch.randint(0, 4, (300,), generator=generator)
    top = probs.max(dim=1).values.argmax()
    labels[top] = (probs[top].argmax() + 1) % 4  # the most confident image is wrong
    confidence, predicted = probs.max(dim=1)
    correct = predicted == labels

    chosen = choose_rejection_threshold(probs, labels, target_precision=0.95)

    assert chosen.precision < chosen.target_precision
    best = _precision_at(confidence, correct, torch.unique(confidence)).max().item()
    assert chosen.precision == pytest.approx(best)


def test_bad_inputs_are_refused_with_the_expected_shape():
    logits, labels = planted_logits(seed=0, n=10)
    with pytest.raises(ValueError, match=r"\(10,\)"):
        fit_temperature(logits, labels[:9])
    with pytest.raises(ValueError, match="empty"):
        fit_temperature(logits[:0], labels[:0])
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        negative_log_likelihood(logits[0], labels[:1])
    with pytest.raises(ValueError, match="not logits"):
        expected_calibration_error(logits, labels)


def test_a_validation_split_separated_perfectly_keeps_a_bounded_temperature():
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    logits = 0.1 * torch.nn.functional.one_hot(labels, 3).float()  # every image right
    with pytest.warns(UserWarning, match="no finite best temperature"):
        temperature = fit_temperature(logits, labels)
    assert temperature == TEMPERATURE_RANGE[0]
