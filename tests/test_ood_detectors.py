"""Fitted OOD detectors: direction on a planted cluster, values against numpy, saved state, selection."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.covariance import ledoit_wolf_shrinkage

from pipeline.errors import UserError
from fake_data import toy_clusters

from pipeline.config import OODConfig
from pipeline.ood import DETECTORS, load_detector, make_detector, save_detector
from pipeline.ood.knn import KNNDetector
from pipeline.ood.mahalanobis import MahalanobisDetector
from pipeline.ood.vim import ViMDetector

D = 8


def _toy(seed: int = 0, n_per_class: int = 30):
    """Three classes clustered on axes 0-2 (plus noise) and a head that reads those axes."""
    emb, labels, centres, rng = toy_clusters(seed, n_per_class, D)
    weight, bias = centres * 0.4, np.array([0.1, -0.2, 0.05])
    test = np.vstack([centres[labels[::9]] + rng.normal(0.0, 0.3, (len(labels[::9]), D)), 10.0 * np.eye(D)[7:8]])
    return emb, labels, (weight, bias), test


def _logits(emb, head):
    return emb @ head[0].T + head[1]


def _anomalies(emb, labels, seed: int = 0):
    """Embeddings of virtual anomalies for detectors that need them: blends of two classes' chips."""
    rng = np.random.default_rng(seed)
    i = rng.integers(0, len(emb), 200)
    j = np.array([rng.choice(np.flatnonzero(labels != labels[k])) for k in i])
    lam = rng.uniform(0.35, 0.65, (200, 1))
    return lam * emb[i] + (1 - lam) * emb[j]


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_planted_cluster_scores_above_a_far_point(name: str) -> None:
    emb, labels, head, test = _toy()
    detector = make_detector(name, OODConfig(knn_k=1, hypersphere_steps=100)).fit(
        _logits(emb, head), emb, labels, head=head, anomalies=_anomalies(emb, labels)
    )
    scores = detector.score(logits=_logits(test, head), embeddings=test)
    assert scores.dtype == np.float64 and scores.shape == (len(test),)
    assert scores[:-1].min() > scores[-1]  # higher = more in-distribution; the last row is the far point


def test_knn_equals_brute_force() -> None:
    rng = np.random.default_rng(1)
    train, test = rng.normal(size=(60, 6)), rng.normal(size=(15, 6))
    train[3] *= 40.0  # a long vector: only its direction may count
    labels = rng.integers(0, 4, 60)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    sims = np.sort(unit(test) @ unit(train).T, axis=1)[:, ::-1]
    for k in (1, 3, 7):
        scores = KNNDetector(k=k).fit(None, train, labels).score(embeddings=test)
        np.testing.assert_allclose(scores, sims[:, k - 1], atol=1e-5)
    capped = KNNDetector(k=1, max_per_class=2, seed=3).fit(None, train, labels)
    assert len(capped.bank) == 8  # two per class
    with pytest.raises(UserError, match="knn_k"):
        KNNDetector(k=0)
    with pytest.raises(UserError, match="exceeds"):
        KNNDetector(k=61).fit(None, train, labels)


def _mahalanobis_by_hand(x, y, test, s):
    classes = np.unique(y)
    means = np.array([x[y == c].mean(axis=0) for c in classes])
    cov = sum((x[y == c] - m).T @ (x[y == c] - m) for c, m in zip(classes, means)) / len(x)
    shrunk = (1 - s) * cov + s * np.trace(cov) / len(cov) * np.eye(len(cov))
    precision = np.linalg.pinv(shrunk, rcond=len(cov) * np.finfo(float).eps)
    dist = np.array([[(t - m) @ precision @ (t - m) for m in means] for t in test])
    return -dist.min(axis=1)


def test_mahalanobis_equals_numpy_with_gaps_in_class_ids_and_a_singular_covariance() -> None:
    rng = np.random.default_rng(2)
    x, test = rng.normal(size=(40, 5)) * [1, 2, 3, 0.5, 1], rng.normal(size=(9, 5))
    y = np.array([0, 2, 5, 5])[rng.integers(0, 4, 40)]  # ids 1, 3, 4 absent (held out)
    for s in (0.0, 0.1):
        scores = MahalanobisDetector(shrinkage=s).fit(None, x, y).score(embeddings=test)
        np.testing.assert_allclose(scores, _mahalanobis_by_hand(x, y, test, s), rtol=1e-9)
    auto = MahalanobisDetector().fit(None, x, y)
    centred = x - np.array([x[y == c].mean(axis=0) for c in np.unique(y)])[np.searchsorted(np.unique(y), y)]
    s = ledoit_wolf_shrinkage(centred, assume_centered=True)
    assert 0 < float(auto.shrinkage_used) == pytest.approx(s)
    np.testing.assert_allclose(auto.score(embeddings=test), _mahalanobis_by_hand(x, y, test, s), rtol=1e-9)
    # fewer chips than dimensions: the covariance is singular, the pseudo-inverse still scores
    few_x, few_y = rng.normal(size=(6, 10)), np.array([0, 0, 0, 1, 1, 1])
    scores = MahalanobisDetector(shrinkage=0.0).fit(None, few_x, few_y).score(embeddings=test[:, :2].repeat(5, 1))
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(scores, _mahalanobis_by_hand(few_x, few_y, test[:, :2].repeat(5, 1), 0.0), rtol=1e-6)
    with pytest.raises(UserError, match="shrinkage"):
        MahalanobisDetector(shrinkage=1.5)


def test_vim_equals_the_reference_computation() -> None:
    """Wang et al.'s code: u = -pinv(W) b, eig of the covariance of x - u, residual off the top `dim`."""
    rng = np.random.default_rng(3)
    x, test = rng.normal(size=(50, 6)) * [3, 2, 1.5, 1, 0.5, 0.2], rng.normal(size=(7, 6))
    w, b = rng.normal(size=(3, 6)), rng.normal(size=3)
    dim = 2
    u = -np.linalg.pinv(w) @ b
    cov = (x - u).T @ (x - u) / len(x)
    eigvals, eigvecs = np.linalg.eig(cov)
    null_space = eigvecs[:, np.argsort(-eigvals)[dim:]]
    alpha = (x @ w.T + b).max(axis=1).mean() / np.linalg.norm((x - u) @ null_space, axis=1).mean()
    logits = test @ w.T + b
    energy = np.log(np.exp(logits).sum(axis=1))
    expected = -(alpha * np.linalg.norm((test - u) @ null_space, axis=1) - energy)

    detector = ViMDetector(dim=dim).fit(None, x, np.zeros(50, int), head=(w, b))
    assert float(detector.alpha) == pytest.approx(alpha, rel=1e-9)
    np.testing.assert_allclose(detector.score(embeddings=test), expected, rtol=1e-9)
    with pytest.raises(ValueError, match="head"):
        ViMDetector(dim=2).fit(None, x, np.zeros(50, int))
    with pytest.raises(UserError, match="vim_dim"):
        ViMDetector(dim=6).fit(None, x, np.zeros(50, int), head=(w, b))


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_state_round_trips_through_npz(name: str, tmp_path) -> None:
    emb, labels, head, test = _toy(seed=4)
    cfg = {"knn_k": 2, "temperature": 1.5, "mahalanobis_shrinkage": "auto", "vim_dim": 3, "hypersphere_steps": 50}
    detector = make_detector(name, OODConfig.model_validate(cfg), seed=7).fit(
        _logits(emb, head), emb, labels, head=head, anomalies=_anomalies(emb, labels)
    )
    path = save_detector(detector, tmp_path / "ood_detector.npz")
    with np.load(path, allow_pickle=False) as data:  # readable without pickle
        assert "__state__" in data.files
    loaded = load_detector(path)
    assert type(loaded) is type(detector) and loaded.params() == detector.params()
    np.testing.assert_array_equal(
        loaded.score(logits=_logits(test, head), embeddings=test),
        detector.score(logits=_logits(test, head), embeddings=test),
    )


def test_unfitted_detector_refuses_to_score_and_unknown_names_are_user_errors() -> None:
    emb, labels, head, test = _toy()
    with pytest.raises(RuntimeError, match="fitted"):
        KNNDetector().score(embeddings=test)
    with pytest.raises(UserError, match="knn, mahalanobis, vim, hypersphere or auto"):
        make_detector("openmax")
