"""Full-batch L-BFGS for a grid of probe heads, as functions on tensors.

Every head is a multinomial logistic regression on its own key's features: the training loss of
all heads together is the sum of their mean losses plus ``0.5 * decay * ||W||^2``, so the heads
stay independent while one L-BFGS run fits them all. scikit-learn's ``LogisticRegression``
solves the same problem with ``C = 1 / (decay * training images)``.

A fit reads the heads through ``HeadLosses``: a function from candidate weights and biases to
the training loss of every head ``(keys,)``, so the caller keeps its normalization and loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# L-BFGS's weight decays, chosen on validation: the penalty is 0.5 * decay * ||W||^2 on the mean
# training loss, so scikit-learn's C is 1 / (decay * training images).
LBFGS_DECAY_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
# Iterations of the fusion head's single fit (it is fitted once, after the last epoch).
FUSION_ITERATIONS = 200

HeadLosses = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
HeadScore = Callable[[torch.Tensor, torch.Tensor], float]


def solver_for(solver: str | None, mode: str, head: str) -> str:
    """The solver of a probe: ``solver``, or by default L-BFGS where it can run (cached features,
    linear heads), else AdamW.

    Raises:
        ValueError: L-BFGS is asked for online features or a head that is not linear.
    """
    solver = solver or ("lbfgs" if mode == "cached" and head == "linear" else "adamw")
    if solver == "lbfgs" and mode != "cached":
        raise ValueError("solver: lbfgs needs mode: cached (full-batch on stored features)")
    if solver == "lbfgs" and head != "linear":
        raise ValueError("head: attention is not a convex problem: use solver adamw or sgd")
    return solver


def decay_grid(weight_decay: float | list[float] | None, solver: str) -> list[float]:
    """The weight decays to try: one, or (L-BFGS only) a grid chosen from on validation."""
    if weight_decay is None:
        return list(LBFGS_DECAY_GRID) if solver == "lbfgs" else [1e-4]
    grid = (
        [float(d) for d in weight_decay]
        if isinstance(weight_decay, list | tuple)
        else [float(weight_decay)]
    )
    if not grid or any(d < 0 for d in grid):
        raise ValueError(
            f"weight_decay must be one decay >= 0 or a list of them, got {weight_decay}"
        )
    if len(grid) > 1 and solver != "lbfgs":
        raise ValueError(
            f"weight_decay: a grid of decays needs solver: lbfgs (got {solver}); "
            "give one decay for AdamW or SGD"
        )
    return grid


def head_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, class_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """The loss of every head ``(keys,)`` from its logits ``(keys, batch, classes)``: the mean
    cross-entropy, or with ``class_weight`` the weighted mean."""
    keys, batch, classes = logits.shape
    losses = F.cross_entropy(
        logits.reshape(-1, classes), labels.repeat(keys), weight=class_weight, reduction="none"
    ).reshape(keys, batch)
    if class_weight is not None:
        return losses.sum(1) / class_weight[labels].sum()
    return losses.mean(1)


def penalized(losses: torch.Tensor, weight: torch.Tensor, decay: float) -> torch.Tensor:
    """The heads' losses summed, plus the L2 penalty on their weights: one objective whose
    minimum is every head's own."""
    return losses.sum() + 0.5 * decay * weight.square().sum()


def lbfgs(parameters: list[torch.Tensor], max_iter: int) -> torch.optim.LBFGS:
    """Full-batch L-BFGS with a strong-Wolfe line search (the solver of scikit-learn's logistic
    regression)."""
    return torch.optim.LBFGS(parameters, lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")


def lbfgs_step(
    optimizer: torch.optim.Optimizer,
    loss: Callable[[], torch.Tensor],
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> None:
    """One L-BFGS step (up to its ``max_iter`` iterations) on ``loss()``; ``backward`` is
    Lightning's ``manual_backward`` for a module's own parameters."""

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = loss()
        backward(value)
        return value

    with torch.enable_grad():
        optimizer.step(closure)


def fit_heads(
    losses: HeadLosses,
    weight: torch.Tensor,
    bias: torch.Tensor,
    decay: float,
    iterations: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The heads fitted by full-batch L-BFGS from ``weight`` and ``bias``, on copies (which the
    caller's parameters, and any gradient synchronisation of theirs, never see)."""
    weight = weight.detach().clone().requires_grad_(True)
    bias = bias.detach().clone().requires_grad_(True)
    lbfgs_step(
        lbfgs([weight, bias], iterations), lambda: penalized(losses(weight, bias), weight, decay)
    )
    return weight.detach(), bias.detach()


@dataclass(frozen=True)
class DecayChoice:
    """The decay of the grid that scored highest, the heads fitted with it, and the score of
    every decay tried."""

    decay: float
    weight: torch.Tensor
    bias: torch.Tensor
    scores: dict[float, float]


def select_weight_decay(
    losses: HeadLosses,
    score: HeadScore,
    weight: torch.Tensor,
    bias: torch.Tensor,
    grid: list[float],
    iterations: int,
) -> DecayChoice:
    """Fit the heads at each decay of ``grid``, strongest first, each fit starting from the last
    one's solution (a regularisation path, so each converges in few iterations), and keep the
    decay whose heads ``score`` highest (on validation); the strongest wins a tie."""
    scores: dict[float, float] = {}
    best = None
    for decay in sorted(grid, reverse=True):
        weight, bias = fit_heads(losses, weight, bias, decay, iterations)
        with torch.no_grad():
            scores[decay] = score(weight, bias)
        if best is None or scores[decay] > scores[best[0]]:
            best = (decay, weight, bias)
    return DecayChoice(*best, scores)


def top_keys(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the ``k`` best-scoring keys, best first: the keys a fusion head reads."""
    return scores.argsort(descending=True)[:k]


def fusion_inputs(x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``(batch, k * width)``: the features ``(keys, batch, width)`` of ``keys``, concatenated."""
    return x[keys].transpose(0, 1).flatten(1)


def fit_fusion(
    inputs: torch.Tensor, labels: torch.Tensor, classes: int, decay: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One logistic regression on the concatenated features ``(batch, k * width)`` of the
    fused keys, by full-batch L-BFGS from zeros; returns its weight and bias."""
    weight = inputs.new_zeros(inputs.shape[1], classes)
    bias = inputs.new_zeros(classes)

    def loss(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(inputs @ weight + bias, labels)

    return fit_heads(loss, weight, bias, decay, FUSION_ITERATIONS)
