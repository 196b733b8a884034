import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from lightning_modules.probes.clustering import cluster_scores, purity


def test_purity_counts_the_majority_label_of_every_cluster():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    clusters = np.array([5, 5, 7, 7, 7, 9, 9, 5])
    # cluster 5: {0, 0, 2} -> 2; cluster 7: {0, 1, 1} -> 2; cluster 9: {2, 2} -> 2
    assert purity(labels, clusters) == pytest.approx(6 / 8)


def test_planted_clusters_score_high_and_noise_scores_low():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    centers = rng.normal(0, 10, (4, 6))
    planted = centers[labels] + rng.normal(0, 0.5, (200, 6))
    noise = rng.normal(0, 1, (200, 6))
    rows = cluster_scores(
        {("planted", 1): torch.tensor(planted), ("noise", 1): torch.tensor(noise)}, labels, k=4
    )
    by_layer = {row["layer"]: row for row in rows}
    assert by_layer["planted"]["nmi"] == pytest.approx(1.0)
    assert by_layer["planted"]["ari"] == pytest.approx(1.0)
    assert by_layer["planted"]["purity"] == pytest.approx(1.0)
    assert by_layer["noise"]["nmi"] < 0.1 and by_layer["noise"]["purity"] < 0.5


def test_scores_are_scikit_learns_on_the_same_clustering():
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 90)
    values = rng.normal(0, 1, (90, 4)) + labels[:, None]
    row = cluster_scores({("x", None): torch.tensor(values)}, labels, k=3, seed=0)[0]
    clusters = KMeans(3, n_init=4, random_state=0).fit_predict(
        StandardScaler().fit_transform(values)
    )
    assert row["nmi"] == pytest.approx(normalized_mutual_info_score(labels, clusters))
    assert row["ari"] == pytest.approx(adjusted_rand_score(labels, clusters))
    assert row["timestep"] == ""
