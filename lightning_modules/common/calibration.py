"""Calibrated probabilities and the rejection of uncertain images as "unknown".

A classifier trained with cross-entropy is usually overconfident, so its raw softmax is a poor
basis for a confidence threshold or for quantification methods that read probabilities (PACC,
EMQ). One scalar temperature fitted on the validation split fixes most of that without changing
any prediction; the rejection threshold is then chosen on the calibrated maximum probability.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_calibration_error

from .abundance import Quantifier

# Precision wanted among the images a classifier accepts; the rest are "unknown".
DEFAULT_TARGET_PRECISION = 0.9


def _check_scores(scores: torch.Tensor, labels: torch.Tensor, name: str) -> None:
    if scores.ndim != 2:
        raise ValueError(f"{name} must have shape (N, C), got {tuple(scores.shape)}")
    if labels.shape != (scores.shape[0],):
        raise ValueError(
            f"labels must have shape ({scores.shape[0]},) to match {name} of shape "
            f"{tuple(scores.shape)}, got {tuple(labels.shape)}"
        )
    if scores.shape[0] == 0:
        raise ValueError(f"{name} is empty: at least one image is needed")


def _check_probs(probs: torch.Tensor, labels: torch.Tensor) -> None:
    _check_scores(probs, labels, "probs")
    # torchmetrics silently softmaxes anything outside [0, 1]; logits passed by mistake would
    # then give a plausible but wrong number instead of an error.
    if probs.min() < 0 or probs.max() > 1:
        raise ValueError("probs must be probabilities in [0, 1], not logits")


def calibrate(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Calibrated class probabilities ``softmax(logits / temperature)``, shape ``(N, C)``."""
    return F.softmax(logits / temperature, dim=-1)


def negative_log_likelihood(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> float:
    """Mean cross-entropy of ``logits / temperature`` against ``labels`` (the quantity that
    temperature scaling minimises, so the one to compare before and after)."""
    _check_scores(logits, labels, "logits")
    return F.cross_entropy(logits.double() / temperature, labels.long()).item()


# The temperatures a fit may return. When every validation image is classified correctly (a
# tiny split) the cross-entropy falls without end as T -> 0 and every probability becomes 1;
# the loss is convex in 1 / T, so the fit clipped to this range is the best T within it.
TEMPERATURE_RANGE = (0.05, 20.0)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature ``T > 0`` minimising the mean cross-entropy of ``logits / T``, within
    ``TEMPERATURE_RANGE`` (with a warning when the fit falls outside it).

    Temperature scaling, Guo et al. 2017, "On Calibration of Modern Neural Networks". Fit it
    on held-out (validation) logits: a temperature fitted on training logits only learns how
    well the model memorised them. Dividing by a positive scalar never changes the argmax, so
    accuracy is untouched. ``log T`` is optimised so that T stays positive without a
    constraint, in float64 so the strong-Wolfe line search is not limited by rounding.

    Args:
        logits: ``(N, C)`` pre-softmax scores.
        labels: ``(N,)`` true class indices.

    Returns:
        The fitted temperature (> 1 when the model was overconfident).
    """
    _check_scores(logits, labels, "logits")
    # Called from Lightning's validation and test loops too, which run under inference mode:
    # the fit needs autograd, and copies of the inputs that autograd may use.
    with torch.inference_mode(False), torch.enable_grad():
        logits = logits.detach().double().clone()
        labels = labels.long().clone()
        log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=50, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(logits / log_t.exp(), labels)
            loss.backward()
            return loss

        optimizer.step(closure)
    fitted = log_t.detach().exp().item()
    low, high = TEMPERATURE_RANGE
    if not low <= fitted <= high:
        warnings.warn(
            f"the temperature fitted on {len(labels)} validation images is {fitted:.3g}, kept at "
            f"{min(max(fitted, low), high):g}: a validation split that the model separates (or "
            "misses) completely has no finite best temperature; calibrate on more images",
            stacklevel=2,
        )
    return min(max(fitted, low), high)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error (L1, equal-width bins on the maximum probability), as
    torchmetrics computes it (Naeini et al. 2015; Guo et al. 2017): the count-weighted mean
    gap between confidence and accuracy."""
    _check_probs(probs, labels)
    return multiclass_calibration_error(
        probs.float(), labels.long(), num_classes=probs.shape[1], n_bins=bins, norm="l1"
    ).item()


@dataclass(frozen=True)
class RejectionThreshold:
    """A threshold on the maximum calibrated probability below which an image is "unknown".

    Attributes:
        threshold: accept an image when its maximum probability is ``>= threshold``; 0 accepts
            every image.
        precision: accuracy of the accepted images on the split it was chosen on.
        coverage: fraction of that split's images accepted.
        target_precision: the precision that was asked for; ``precision < target_precision``
            means no threshold reached it.
    """

    threshold: float
    precision: float
    coverage: float
    target_precision: float


def choose_rejection_threshold(
    probs: torch.Tensor, labels: torch.Tensor, target_precision: float = 0.9
) -> RejectionThreshold:
    """The lowest threshold on the maximum probability whose accepted images reach
    ``target_precision`` accuracy, so that as many images as possible are kept (selective
    classification, Geifman & El-Yaniv 2017).

    The candidates are the distinct maximum probabilities of ``probs``: between two of them the
    accepted set does not change. Precision need not fall monotonically as the threshold is
    lowered, so every candidate is checked rather than stopping at the first failure. When the
    lowest candidate qualifies the threshold is reported as 0 (accept all), so that images less
    confident than any seen here are not rejected by accident.

    When no threshold reaches the target, the one with the highest precision (the lowest of
    those, for coverage) is returned and its ``precision`` is below ``target_precision``:
    callers must check that rather than expect an error.

    Args:
        probs: ``(N, C)`` calibrated probabilities of a held-out split.
        labels: ``(N,)`` true class indices.
        target_precision: the accuracy wanted among accepted images, in ``[0, 1]``.
    """
    _check_probs(probs, labels)
    if not 0.0 <= target_precision <= 1.0:
        raise ValueError(f"target_precision must be in [0, 1], got {target_precision}")
    confidence, predicted = probs.double().max(dim=1)
    correct = (predicted == labels.long()).double()
    order = torch.argsort(confidence, descending=True)
    confidence, correct = confidence[order], correct[order]
    accepted = torch.arange(1, len(confidence) + 1, dtype=torch.float64)
    precision = correct.cumsum(0) / accepted
    # Ties share one threshold, so only the last position of each run of equal confidences is
    # a candidate (accepting part of a tie is not expressible as a threshold).
    last_of_tie = torch.ones_like(confidence, dtype=torch.bool)
    last_of_tie[:-1] = confidence[:-1] != confidence[1:]
    candidates = torch.nonzero(last_of_tie).squeeze(1)
    reaching = candidates[precision[candidates] >= target_precision]
    if len(reaching):
        chosen = reaching[-1]
    else:
        best = precision[candidates].max()
        chosen = candidates[precision[candidates] == best][-1]
    threshold = 0.0 if chosen == len(confidence) - 1 else confidence[chosen].item()
    return RejectionThreshold(
        threshold=threshold,
        precision=precision[chosen].item(),
        coverage=accepted[chosen].item() / len(confidence),
        target_precision=target_precision,
    )


def reject(probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(N,)`` boolean mask of the images to report as "unknown": maximum probability below
    ``threshold``."""
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape (N, C), got {tuple(probs.shape)}")
    return probs.max(dim=1).values < threshold


@dataclass(frozen=True)
class Calibration:
    """What a classifier learned about its own probabilities on the validation split, stored in
    its checkpoint: the temperature that calibrates them, the calibration error before and after,
    the rejection threshold, and the quantifier that corrects counts for a change of class priors.
    Labels are read only here, for the classifier's own monitoring and selection."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    rejection: RejectionThreshold
    quantifier: Quantifier

    @classmethod
    def fit(
        cls,
        logits: torch.Tensor,
        labels: torch.Tensor,
        train_counts: torch.Tensor,
        target_precision: float = DEFAULT_TARGET_PRECISION,
    ) -> Calibration:
        """Fit on the validation split's ``(N, C)`` logits and labels; ``train_counts`` are the
        training images per class, the priors the classifier's posteriors reflect (EMQ)."""
        logits, labels = logits.detach().double().cpu(), labels.detach().long().cpu()
        temperature = fit_temperature(logits, labels)
        before, after = F.softmax(logits, dim=-1), calibrate(logits, temperature)
        return cls(
            temperature=temperature,
            ece_before=expected_calibration_error(before, labels),
            ece_after=expected_calibration_error(after, labels),
            nll_before=negative_log_likelihood(logits, labels),
            nll_after=negative_log_likelihood(logits, labels, temperature),
            rejection=choose_rejection_threshold(after, labels, target_precision),
            # A class with no training image cannot be a prior of zero: EMQ divides by it.
            quantifier=Quantifier.fit(
                after.numpy(), labels.numpy(), train_counts.double().clamp(min=1).numpy()
            ),
        )

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities of ``(N, C)`` logits."""
        return calibrate(logits.float(), self.temperature)

    def to_dict(self) -> dict:
        """Plain values only: checkpoints are read with ``torch.load(weights_only=True)``."""
        return {
            "temperature": self.temperature,
            "ece_before": self.ece_before,
            "ece_after": self.ece_after,
            "nll_before": self.nll_before,
            "nll_after": self.nll_after,
            "rejection": asdict(self.rejection),
            "quantifier": self.quantifier.to_dict(),
        }

    @classmethod
    def from_dict(cls, state: Mapping) -> Calibration:
        fields = {k: state[k] for k in ("temperature", "ece_before", "ece_after", "nll_before",
                                        "nll_after")}  # fmt: skip
        return cls(
            **fields,
            rejection=RejectionThreshold(**state["rejection"]),
            quantifier=Quantifier.from_dict(state["quantifier"]),
        )


class MissingCalibrationError(ValueError):
    """A checkpoint written before classifiers stored their calibration."""


def checkpoint_calibrations(checkpoint: Mapping, path: str | Path) -> dict[str, Calibration]:
    """The calibrations a classifier checkpoint holds: ``classify`` (what ``classify`` returns)
    and, for a probe, ``fusion``.

    Raises:
        MissingCalibrationError: the checkpoint has none; the message names the command that
            adds it.
    """
    stored = checkpoint.get("calibration")
    if not stored:
        raise MissingCalibrationError(
            f"{path} holds no calibration (temperature, validation confusion, rejection "
            "threshold): it was written before the suite stored them. Add them by testing it "
            f"once: plankton test --config <its config> --ckpt_path {path}"
        )
    return {name: Calibration.from_dict(state) for name, state in stored.items()}
