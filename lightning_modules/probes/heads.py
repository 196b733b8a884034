"""The probe's heads: the normalization of every key's features ``(keys, batch, width)``, and
plain modules from those to logits ``(keys, batch, classes)``.

The heads may be given ``weight`` and ``bias`` in place of their own parameters (tensors of their
shapes): the solver fits copies, outside the module's gradient synchronisation under DDP.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .features import FeatureKey, FeatureSource


class FeatureNormalization(nn.Module):
    """What the heads read: every key's features, zero-padded to one width, standardized, their
    padding zeroed again (so it adds nothing to the logits) and, with ``l2_normalize``, scaled
    to unit length.

    ``standardize``: ``train`` (the mean and std of each feature, set by ``fit`` on the training
    set), ``batchnorm`` (a BatchNorm without affine parameters) or ``none``.
    """

    def __init__(
        self,
        widths: list[int],
        standardize: Literal["train", "batchnorm", "none"],
        l2_normalize: bool,
    ) -> None:
        super().__init__()
        self.standardize, self.l2_normalize = standardize, l2_normalize
        keys, width = len(widths), max(widths)
        self.register_buffer("valid", torch.arange(width)[None, :] < torch.tensor(widths)[:, None])
        self.register_buffer("mean", torch.zeros(keys, width))
        self.register_buffer("std", torch.ones(keys, width))
        self.norm = (
            nn.BatchNorm1d(keys * width, affine=False) if standardize == "batchnorm" else None
        )

    @torch.no_grad()
    def fit(self, x: Tensor) -> None:
        """Standardize by the mean and std of ``x`` ``(keys, N, width)``, the training set."""
        mean = x.double().mean(dim=1)
        std = x.double().std(dim=1, correction=0)
        self.mean.copy_(mean * self.valid)
        self.std.copy_(torch.where(self.valid & (std > 1e-6), std, 1.0))

    def forward(self, x: Tensor) -> Tensor:
        if self.standardize == "train":
            x = (x - self.mean[:, None]) / self.std[:, None]
        elif self.norm is not None:
            keys, batch, width = x.shape
            x = self.norm(x.transpose(0, 1).reshape(batch, -1)).reshape(batch, keys, width)
            x = x.transpose(0, 1)
        x = x * self.valid[:, None]
        if self.l2_normalize:
            x = F.normalize(x, dim=-1)
        return x


class LinearHeads(nn.Module):
    """One linear head per key, all applied in one batched matrix product
    ``(keys, batch, width) @ (keys, width, classes)``."""

    def __init__(self, heads: int, width: int, classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(heads, width, classes))
        self.bias = nn.Parameter(torch.zeros(heads, classes))

    def forward(
        self, x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None
    ) -> Tensor:
        weight = self.weight if weight is None else weight
        bias = self.bias if bias is None else bias
        return torch.baddbmm(bias[:, None], self.pool(x), weight)

    def pool(self, x: Tensor) -> Tensor:
        """What the linear layer reads: the features themselves."""
        return x


class AttentionHead(LinearHeads):
    """NOT linear: attention pooling over one key's spatial tokens, then a linear layer.

    A learned query weighs the positions (softmax of their match with it) and the linear layer
    reads the weighted average: channels + channels x classes parameters, as diffssl's attention
    head. The problem is not convex, so it is trained by a gradient solver.
    """

    def __init__(self, channels: int, classes: int) -> None:
        super().__init__(1, channels, classes)
        self.query = nn.Parameter(torch.zeros(1, channels))

    @classmethod
    def for_features(
        cls, features: FeatureSource, keys: list[FeatureKey], classes: int
    ) -> AttentionHead:
        """The head over the tokens of ``features``' one key.

        Raises:
            ValueError: ``features`` has several keys, or no spatial tokens.
        """
        if len(keys) != 1 or not hasattr(features, "token_channels"):
            raise ValueError(
                f"head: attention reads the spatial tokens of one (layer, timestep) key of "
                f"DiffusionFeatures with pooling: tokens; these features have {len(keys)} "
                "keys: give one layer and one timestep"
            )
        return cls(features.token_channels()[keys[0]], classes)

    def pool(self, x: Tensor) -> Tensor:
        """``(1, batch, positions x channels)`` tokens to ``(1, batch, channels)``: their
        average weighted by a softmax over positions of each token's match with the query."""
        keys, batch, _ = x.shape
        channels = self.query.shape[1]
        tokens = x.reshape(keys, batch, -1, channels)
        weights = (tokens @ self.query[:, None, :, None] / channels**0.5).softmax(dim=2)
        return (weights * tokens).sum(dim=2)


# Where the state of ``ProbeModule`` checkpoints written before the normalization and the heads
# were modules of their own now lives: its top-level entries, by the attribute holding them now.
_MOVED_STATE = {"weight": "heads", "bias": "heads", "query": "heads"} | {
    name: "normalization" for name in ("valid", "mean", "std", "norm")
}


def load_moved_state(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    """A load-state-dict pre-hook of ``ProbeModule``: move the entries of a checkpoint of the old
    layout (``weight``, ``norm.running_mean``...) to where they live now (``heads.weight``,
    ``normalization.norm.running_mean``...), so that it loads as before."""
    for key in [key for key in state_dict if key.startswith(prefix)]:
        name = key[len(prefix) :]
        owner = _MOVED_STATE.get(name.split(".", 1)[0])
        if owner is not None:
            state_dict[f"{prefix}{owner}.{name}"] = state_dict.pop(key)
