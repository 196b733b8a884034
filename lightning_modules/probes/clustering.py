"""k-means of frozen features at every key, scored against the labels."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix
from sklearn.preprocessing import StandardScaler

from .features import FeatureKey


def purity(labels: np.ndarray, clusters: np.ndarray) -> float:
    """Fraction of images whose cluster's most common label is their own."""
    table = contingency_matrix(labels, clusters)
    return float(table.max(axis=0).sum() / table.sum())


def cluster_scores(
    features: dict[FeatureKey, torch.Tensor], labels: np.ndarray, k: int, seed: int = 0
) -> list[dict]:
    """For every key: k-means on standardised features, and NMI, ARI and purity."""
    rows = []
    for (layer, timestep), values in features.items():
        x = StandardScaler().fit_transform(values.float().numpy())
        clusters = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x)
        rows.append(
            {
                "layer": layer,
                "timestep": "" if timestep is None else timestep,
                "nmi": normalized_mutual_info_score(labels, clusters),
                "ari": adjusted_rand_score(labels, clusters),
                "purity": purity(labels, clusters),
            }
        )
    return rows
