"""The probe's solver on plain tensors, without a Trainer, against scikit-learn's logistic
regression: weight decay d is its C = 1 / (d * training images)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from lightning_modules.probes.heads import LinearHeads
from lightning_modules.probes.solver import (
    LBFGS_DECAY_GRID,
    decay_grid,
    fit_fusion,
    fit_heads,
    fusion_inputs,
    head_cross_entropy,
    select_weight_decay,
    top_keys,
)

CLASSES = 3


def _blobs(seed, n, width, informative, spread):
    """``n`` points of ``CLASSES`` classes whose first ``informative`` features are shifted by
    the class's centre, the others noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    x = rng.normal(size=(n, width))
    x[:, :informative] += rng.normal(size=(CLASSES, informative))[labels] * spread
    return x, labels


def _reference(x, labels, decay):
    return LogisticRegression(C=1 / (decay * len(labels)), tol=1e-12, max_iter=10_000).fit(
        x, labels
    )


def _heads_losses(heads, x, labels):
    return lambda weight, bias: head_cross_entropy(heads(x, weight, bias), labels)


def test_every_head_reaches_the_scikit_learn_solution_of_its_own_key():
    """Two keys of different widths, zero-padded into one batched problem: each head's
    probabilities are scikit-learn's on that key alone."""
    decay = 0.05
    first, labels = _blobs(0, 90, 5, 2, 3.0)
    second = first[:, 2:] + np.random.default_rng(1).normal(size=(90, 3))
    x = torch.zeros(2, 90, 5, dtype=torch.float64)
    x[0], x[1, :, :3] = torch.from_numpy(first), torch.from_numpy(second)
    heads = LinearHeads(2, 5, CLASSES).double()
    targets = torch.from_numpy(labels)
    weight, bias = fit_heads(
        _heads_losses(heads, x, targets), heads.weight, heads.bias, decay, iterations=500
    )
    probabilities = heads(x, weight, bias).softmax(-1)
    for key, features in enumerate((first, second)):
        expected = _reference(features, labels, decay).predict_proba(features)
        np.testing.assert_allclose(probabilities[key].numpy(), expected, atol=1e-4)
    assert torch.equal(heads.weight, torch.zeros_like(heads.weight))  # fitted on copies
    assert not weight[1, 3:].any()  # the padding adds nothing


def test_the_decay_grid_keeps_the_decay_scikit_learn_validates_best():
    x, labels = _blobs(0, 300, 20, 2, 0.8)
    train, val = slice(0, 60), slice(60, None)
    grid = [1e-3, 1e-2, 1e-1, 1.0]
    expected = {d: _reference(x[train], labels[train], d).score(x[val], labels[val]) for d in grid}
    best = max(expected, key=expected.get)
    assert best not in (min(grid), max(grid))  # a choice, not an end of the grid
    inputs = torch.from_numpy(x)[None]
    targets = torch.from_numpy(labels)
    heads = LinearHeads(1, 20, CLASSES).double()

    def accuracy(weight, bias):
        predictions = heads(inputs[:, val], weight, bias).argmax(-1)
        return float((predictions == targets[val]).double().mean())

    choice = select_weight_decay(
        _heads_losses(heads, inputs[:, train], targets[train]),
        accuracy,
        heads.weight,
        heads.bias,
        grid,
        iterations=500,
    )
    assert choice.scores == pytest.approx(expected)
    assert choice.decay == best
    refit, _ = fit_heads(
        _heads_losses(heads, inputs[:, train], targets[train]),
        heads.weight,
        heads.bias,
        best,
        iterations=500,
    )
    assert torch.allclose(choice.weight, refit, atol=1e-3)  # the kept heads are that decay's


def test_the_fusion_reads_the_best_keys_concatenated_and_solves_their_regression():
    decay = 0.02
    features, labels = _blobs(2, 80, 12, 4, 1.5)
    x = torch.from_numpy(features).reshape(80, 3, 4).transpose(0, 1)  # three keys of 4
    keys = top_keys(torch.tensor([0.2, 0.9, 0.5]), 2)
    assert keys.tolist() == [1, 2]
    inputs = fusion_inputs(x, keys)
    assert torch.equal(inputs, torch.cat([x[1], x[2]], dim=1))
    weight, bias = fit_fusion(inputs, torch.from_numpy(labels), CLASSES, decay)
    reference = _reference(inputs.numpy(), labels, decay)
    probabilities = (inputs @ weight + bias).softmax(-1)
    np.testing.assert_allclose(probabilities.numpy(), reference.predict_proba(inputs), atol=1e-4)


def test_the_class_balanced_loss_is_the_weighted_mean_of_every_head():
    torch.manual_seed(0)
    logits = torch.randn(2, 10, CLASSES)
    labels = torch.randint(0, CLASSES, (10,))
    class_weight = torch.tensor([0.5, 1.0, 2.0])
    losses = head_cross_entropy(logits, labels, class_weight)
    for head in range(2):
        expected = F.cross_entropy(logits[head], labels, weight=class_weight)
        assert losses[head].item() == pytest.approx(expected.item())
        plain = F.cross_entropy(logits[head], labels)
        assert head_cross_entropy(logits, labels)[head].item() == pytest.approx(plain.item())


def test_the_decay_grid_defaults_and_refusals():
    assert decay_grid(None, "lbfgs") == list(LBFGS_DECAY_GRID)
    assert decay_grid(None, "adamw") == [1e-4]
    assert decay_grid([0.1, 1], "lbfgs") == [0.1, 1.0]
    with pytest.raises(ValueError, match="one decay >= 0"):
        decay_grid(-1.0, "sgd")
    with pytest.raises(ValueError, match="a grid of decays needs solver: lbfgs"):
        decay_grid([0.1, 1], "sgd")
