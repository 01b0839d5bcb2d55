"""faiss k-means and winner-take-all label voting inside clusters."""

from __future__ import annotations

from pathlib import Path

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


def _probs_second(labels: list[int], confidences: list[float], seconds: list[int]) -> np.ndarray:
    """Like `_probs`, but the class `seconds[i]` is row i's clear second choice (the rest share what is left)."""
    probs = np.empty((len(labels), NUM_CLASSES))
    for row, (label, conf, second) in enumerate(zip(labels, confidences, seconds)):
        assert second != label
        probs[row] = 0.2 * (1.0 - conf) / (NUM_CLASSES - 2)
        probs[row, second] = 0.8 * (1.0 - conf)
        probs[row, label] = conf
    return probs


# (labels, confidences, second choices) of each cluster of the voting test; tau = 0.8 marks voters.
VOTING_CASES = {
    # A: voters 1,1,1 (3 of 10, share 1.0): the unsure members whose top-2 holds 1 become 1; the last
    #    one's top-2 is {0, 2}, so it keeps 0 (the winner is outside its own top-k)
    "A": ([1, 1, 1, 0, 2, 3, 0, 2, 3, 0], [0.9, 0.95, 0.85, 0.5, 0.5, 0.6, 0.55, 0.7, 0.5, 0.5], [0, 0, 0, 1, 1, 1, 1, 1, 1, 2]),
    # B: a single confident member (share 1.0 of 1 voter) among 10: nothing changes
    "B": ([2, 0, 0, 1, 1, 3, 3, 0, 1, 3], [0.99, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5], [0, 2, 2, 2, 2, 2, 2, 2, 2, 2]),
    # C: two voters of 5 (voter share 0.4 is enough, but fewer than min_voters = 3): nothing changes
    "C": ([3, 3, 0, 1, 2], [0.9, 0.9, 0.5, 0.5, 0.5], [0, 0, 3, 3, 3]),
    # D: three voters of 20 (share 0.15 < min_voter_share): nothing changes
    "D": ([0, 0, 0] + [1, 2, 3] * 5 + [1, 2], [0.9] * 3 + [0.5] * 17, [1] * 3 + [0] * 17),
    # E: voters 1,1,2,3 (4 of 10) -> label share 1/2 < rho: nothing changes
    "E": ([1, 1, 2, 3, 0, 0, 2, 2, 3, 3], [0.9] * 4 + [0.5] * 6, [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]),
    # F: voters 3,3,3,3 (4 of 10, share 1.0), but 3 is in no unsure member's top-2: nothing changes
    "F": ([3, 3, 3, 3, 0, 1, 2, 0, 1, 2], [0.9, 0.9, 0.9, 0.8] + [0.5] * 6, [0, 0, 0, 0, 1, 2, 0, 2, 0, 1]),
}


def _voting_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings (one tight blob per case, norms varying), probabilities, labels, blob of each chip."""
    cases = list(VOTING_CASES.values())
    labels = np.array([lab for case in cases for lab in case[0]])
    probs = _probs_second(labels.tolist(), [c for case in cases for c in case[1]], [s for case in cases for s in case[2]])
    embeddings, truth = _blobs([len(case[0]) for case in cases], dim=8, spread=0.001, seed=2)
    embeddings *= np.random.default_rng(3).uniform(0.5, 5.0, (len(labels), 1)).astype(np.float32)  # norms vary
    return embeddings, probs, labels, truth


def test_voting_changes_exactly_the_labels_the_rule_says() -> None:
    embeddings, probs, labels, truth = _voting_data()
    np.testing.assert_array_equal(probs.argmax(1), labels)
    rule = {"tau": 0.8, "rho": 0.6, "min_voters": 3, "min_voter_share": 0.3, "top_k": 2}
    # one random k-means start can merge two blobs; seed 3 recovers them (checked by the purity below)
    result = cluster_vote(embeddings, probs, k=len(VOTING_CASES), niter=20, seed=3, **rule)

    expected = labels.copy()
    expected[3:9] = 1  # case A: the six unsure members with 1 in their top-2; the tenth keeps 0
    np.testing.assert_array_equal(result.labels, expected)
    np.testing.assert_array_equal(result.labels_before, labels)
    np.testing.assert_array_equal(result.changed, expected != labels)
    assert _purity(result.cluster, truth) == 1.0

    table = result.cluster_table
    assert list(table.columns) == list(CLUSTER_TABLE_COLUMNS) and result.k == len(VOTING_CASES)
    first = np.cumsum([0] + [len(case[0]) for case in VOTING_CASES.values()])[:-1]
    by_case = table.set_index("cluster").loc[result.cluster[first]]
    assert by_case["size"].tolist() == [10, 10, 5, 20, 10, 10]
    assert by_case["voters"].tolist() == [3, 1, 2, 3, 4, 4]
    assert by_case["winner"].tolist() == [1, 2, 3, 0, 1, 3]
    assert by_case["applied"].tolist() == [True, False, False, False, False, True]
    assert by_case["changed"].tolist() == [6, 0, 0, 0, 0, 0]
    assert by_case["outside_top_k"].tolist() == [1, 0, 0, 0, 0, 6]
    np.testing.assert_allclose(by_case["share"].to_numpy(), [1.0, 1.0, 1.0, 1.0, 0.5, 1.0])
    np.testing.assert_allclose(by_case["voter_share"].to_numpy(), [0.3, 0.1, 0.4, 0.15, 0.4, 0.4])

    # The guards are what hold B, C, D and F back: without them (the old rule) those clusters flip.
    loose = cluster_vote(
        embeddings, probs, k=len(VOTING_CASES), niter=20, seed=3,
        **{**rule, "min_voters": 1, "min_voter_share": 0.0, "top_k": NUM_CLASSES},
    )
    np.testing.assert_array_equal(loose.cluster, result.cluster)  # same seed, same clustering
    assert loose.cluster_table.set_index("cluster").loc[result.cluster[first], "changed"].tolist() == [7, 9, 3, 17, 0, 6]


def test_one_confident_chip_never_relabels_its_cluster() -> None:
    """Issue 9, item 4: one voter among 62 members changed 33 labels. With the default guards it changes none."""
    embeddings, _ = _blobs([62], dim=4)
    labels = [0] + [1, 2, 3] * 20 + [1]
    probs = _probs_second(labels, [0.99] + [0.5] * 61, [1] + [0] * 61)
    result = cluster_vote(embeddings, probs, k=1, tau=0.9, rho=0.6)  # default min_voters, min_voter_share, top_k
    assert not result.changed.any() and not bool(result.cluster_table["applied"].iloc[0])
    np.testing.assert_array_equal(result.labels, labels)


def test_auto_k_is_used_and_no_vote_changes_nothing() -> None:
    # five blobs of ten: six confident members of class c, four unsure ones with c as second choice
    sizes = [10] * 5
    embeddings, truth = _blobs(sizes, dim=8, spread=0.001, seed=0)  # k-means seed 0 recovers these blobs
    unsure = np.tile(np.arange(10) >= 6, 5)
    labels = np.where(unsure, (truth + 1) % NUM_CLASSES, truth % NUM_CLASSES)
    seconds = np.where(unsure, truth % NUM_CLASSES, (truth + 1) % NUM_CLASSES)
    probs = _probs_second(labels.tolist(), np.where(unsure, 0.5, 0.9).tolist(), seconds.tolist())

    result = cluster_vote(embeddings, probs, k="auto", tau=0.8, rho=0.6, min_voters=3, min_voter_share=0.2, top_k=2)
    assert result.k == auto_k(50, NUM_CLASSES) == 5 != NUM_CLASSES
    assert len(np.unique(result.cluster)) == 5 and _purity(result.cluster, truth) == 1.0
    np.testing.assert_array_equal(result.labels, truth % NUM_CLASSES)  # the unsure members took their blob's label
    np.testing.assert_array_equal(result.changed, unsure)

    off = no_vote(probs)
    np.testing.assert_array_equal(off.labels, labels)
    np.testing.assert_array_equal(off.labels_before, labels)
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
        ({"min_voters": 0}, "infer.cluster.min_voters"),
        ({"min_voters": 2.5}, "infer.cluster.min_voters"),
        ({"min_voter_share": 1.5}, "infer.cluster.min_voter_share"),
        ({"min_voter_share": "most"}, "infer.cluster.min_voter_share"),
        ({"top_k": 0}, "infer.cluster.top_k"),
        ({"top_k": True}, "infer.cluster.top_k"),
    ],
)
def test_bad_voting_settings_are_user_errors(kwargs: dict, match: str) -> None:
    embeddings, _ = _blobs([10, 10, 10], dim=4)
    settings = {"k": 3, "tau": 0.9, "rho": 0.6, "niter": 10, **kwargs}
    with pytest.raises(UserError, match=match):
        cluster_vote(embeddings, _probs([0] * 30, [0.9] * 30), **settings)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    from pipeline.data.synth import generate

    root = tmp_path_factory.mktemp("voting") / "data"
    generate(root, "tiny", seed=5)
    return root


@pytest.mark.parametrize(
    ("override", "key"),
    [("infer.cluster.min_voters=0", "min_voters"), ("infer.cluster.min_voter_share=2", "min_voter_share"),
     ("infer.cluster.top_k=0", "top_k"), ("infer.cluster.rho=0", "rho")],
)
def test_infer_refuses_bad_voting_settings_before_predicting(
    tiny_data: Path, tmp_path: Path, capsys, override: str, key: str
) -> None:
    """The infer stage checks the voting keys first: the error names the key, not the missing model."""
    from stages import infer

    with pytest.raises(SystemExit) as exc:
        infer.main([
            "--data", str(tiny_data), "--profile", "tiny", "--weights", str(tmp_path / "no_weights"),
            "--cache-dir", str(tiny_data.parent / "cache"), "--submissions", str(tmp_path / "subs"),
            "--set", "infer.cluster.enabled=true", "--set", override,
        ])
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"infer.cluster.{key}" in last and "finetune_head" not in last
