"""faiss k-means and winner-take-all label voting inside clusters."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.cluster import CLUSTER_TABLE_COLUMNS, auto_k, cluster_vote, kmeans, no_vote
from pipeline.errors import UserError

NUM_CLASSES = 4


def _blobs(sizes: list[int], dim: int = 8, spread: float = 0.01, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tight blobs around orthogonal directions (so they stay apart after L2 normalisation)."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    centres = 10.0 * np.eye(dim)[: len(sizes)]
    points = centres[truth] + spread * rng.standard_normal((len(truth), dim))
    return points.astype(np.float32), truth


def _purity(assignments: np.ndarray, truth: np.ndarray) -> float:
    """Share of points whose cluster's majority true label equals their own."""
    hits = sum(np.bincount(truth[assignments == c]).max() for c in np.unique(assignments))
    return hits / len(truth)


def _probs(labels: list[int], confidences: list[float]) -> np.ndarray:
    """Probabilities with argmax `labels` and max probability `confidences` (rest spread evenly)."""
    probs = np.empty((len(labels), NUM_CLASSES))
    for row, (label, conf) in enumerate(zip(labels, confidences)):
        probs[row] = (1.0 - conf) / (NUM_CLASSES - 1)
        probs[row, label] = conf
    return probs


def test_kmeans_separates_well_separated_blobs() -> None:
    points, truth = _blobs([30, 50, 20, 40])
    assignments, centroids = kmeans(points, 4, niter=20, seed=0)
    assert assignments.dtype == np.int64 and assignments.shape == (140,)
    assert centroids.shape == (4, 8) and centroids.dtype == np.float32
    assert _purity(assignments, truth) == 1.0
    assert len(np.unique(assignments)) == 4


def test_kmeans_is_repeatable_with_a_seed() -> None:
    points = np.random.default_rng(1).standard_normal((300, 5)).astype(np.float32)
    first, c1 = kmeans(points, 7, seed=3)
    second, c2 = kmeans(points, 7, seed=3)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(c1, c2)


def test_kmeans_rejects_bad_k() -> None:
    points = np.zeros((5, 3), np.float32)
    for bad in (0, 6, 2.5, "3"):
        with pytest.raises(UserError, match="k="):
            kmeans(points, bad)  # type: ignore[arg-type]


def test_kmeans_gpu_request_without_gpu_is_a_user_error() -> None:
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("this faiss has a GPU")
    with pytest.raises(UserError, match="GPU"):
        kmeans(np.zeros((5, 3), np.float32), 2, use_gpu=True)


@pytest.mark.parametrize(
    ("n", "num_classes", "expected"),
    [(20_000, 10, 100), (800, 10, 20), (100, 10, 10), (30, 10, 6), (3, 10, 1), (0, 10, 1)],
)
def test_auto_k_rule(n: int, num_classes: int, expected: int) -> None:
    assert auto_k(n, num_classes) == expected


def test_voting_changes_exactly_the_labels_the_rule_says() -> None:
    tau, rho = 0.8, 0.6
    # five clusters of five (one per direction); per cluster: (labels, confidences)
    cases = [
        # A: voters 1,1,2 -> label 1 has share 2/3 >= rho: the two unsure members become 1
        ([1, 1, 2, 3, 0], [0.9, 0.95, 0.85, 0.3, 0.5]),
        # B: voters 1,2 -> share 1/2 < rho: nothing changes
        ([1, 2, 3, 3, 0], [0.9, 0.9, 0.4, 0.4, 0.4]),
        # C: no voters at all: nothing changes
        ([0, 1, 2, 3, 3], [0.5, 0.6, 0.7, 0.79, 0.3]),
        # D: one voter (share 1): everybody becomes 3; a voter at exactly tau counts as a voter
        ([3, 0, 1, 2, 2], [0.8, 0.3, 0.3, 0.3, 0.3]),
        # E: voters 2,2,2,0,0 -> share 3/5 = rho exactly: applied; no non-voters to change
        ([2, 2, 2, 0, 0], [0.9, 0.9, 0.9, 0.9, 0.9]),
    ]
    labels = [lab for lab_list, _ in cases for lab in lab_list]
    confidences = [c for _, conf in cases for c in conf]
    probs = _probs(labels, confidences)
    embeddings, truth = _blobs([5] * len(cases), dim=8, spread=0.001, seed=2)
    embeddings *= np.random.default_rng(3).uniform(0.5, 5.0, (len(labels), 1)).astype(np.float32)  # norms vary

    result = cluster_vote(embeddings, probs, k=5, tau=tau, rho=rho, niter=20, seed=0)

    expected = np.array(
        [1, 1, 2, 1, 1] + [1, 2, 3, 3, 0] + [0, 1, 2, 3, 3] + [3, 3, 3, 3, 3] + [2, 2, 2, 0, 0]
    )
    np.testing.assert_array_equal(result.labels, expected)
    np.testing.assert_array_equal(result.labels_before, np.array(labels))
    np.testing.assert_array_equal(result.changed, expected != np.array(labels))
    assert _purity(result.cluster, truth) == 1.0

    table = result.cluster_table
    assert list(table.columns) == list(CLUSTER_TABLE_COLUMNS) and result.k == 5
    by_case = table.set_index("cluster").loc[[result.cluster[5 * i] for i in range(len(cases))]]
    assert by_case["size"].tolist() == [5, 5, 5, 5, 5]
    assert by_case["voters"].tolist() == [3, 2, 0, 1, 5]
    assert by_case["winner"].tolist() == [1, 1, -1, 3, 2]
    assert by_case["applied"].tolist() == [True, False, False, True, True]
    assert by_case["changed"].tolist() == [2, 0, 0, 4, 0]
    np.testing.assert_allclose(by_case["share"].to_numpy(), [2 / 3, 0.5, np.nan, 1.0, 0.6])


def test_auto_k_is_used_and_no_vote_changes_nothing() -> None:
    embeddings, _ = _blobs([10, 10, 10], dim=4)
    probs = _probs([0] * 30, [0.9] * 30)
    result = cluster_vote(embeddings, probs, k="auto", tau=0.5, rho=0.5)
    assert result.k == auto_k(30, NUM_CLASSES) and not result.changed.any()

    off = no_vote(probs)
    np.testing.assert_array_equal(off.labels, probs.argmax(1))
    assert not off.changed.any() and (off.cluster == -1).all() and off.k == 0
    assert list(off.cluster_table.columns) == list(CLUSTER_TABLE_COLUMNS) and len(off.cluster_table) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": "many"}, "infer.cluster.k"),
        ({"k": 31}, "infer.cluster.k"),
        ({"tau": 1.5}, "infer.cluster.tau"),
        ({"tau": "high"}, "infer.cluster.tau"),
        ({"rho": 0.0}, "infer.cluster.rho"),
        ({"niter": 0}, "niter"),
    ],
)
def test_bad_voting_settings_are_user_errors(kwargs: dict, match: str) -> None:
    embeddings, _ = _blobs([10, 10, 10], dim=4)
    settings = {"k": 3, "tau": 0.9, "rho": 0.6, "niter": 10, **kwargs}
    with pytest.raises(UserError, match=match):
        cluster_vote(embeddings, _probs([0] * 30, [0.9] * 30), **settings)
