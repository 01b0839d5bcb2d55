"""Virtual anomalies and the hypersphere OOD detector trained against them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fake_data import chip

from pipeline.config import OODConfig
from pipeline.errors import UserError
from pipeline.ood import load_detector, make_detector, save_detector
from pipeline.ood.anomalies import KINDS, AnomalyDataset, batch_anomalies, make_anomalies
from pipeline.ood.hypersphere import HypersphereDetector, hypersphere_loss

D = 8


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_anomalies_differ_from_their_sources_keep_the_value_range_and_are_seeded(dtype: str) -> None:
    chips = np.stack([chip(s, 24, 20) for s in range(6)])
    if dtype == "float32":
        chips = (chips.astype(np.float32) - 128.0) / 40.0  # standardised-like values, negative too
    labels = np.array([0, 0, 1, 1, 2, 2])
    out, sources = make_anomalies(chips, labels, count=12, seed=3, kinds=KINDS)
    assert out.shape == (12, 24, 20) and out.dtype == chips.dtype
    assert sources.shape == (12, 2)
    for k, (i, j) in enumerate(sources):
        kind = KINDS[k % len(KINDS)]
        assert not np.array_equal(out[k], chips[i]) and not np.array_equal(out[k], chips[j]), kind
        if kind != "shuffle":
            assert labels[i] != labels[j]  # cut-and-paste and mixing join two classes
        low, high = min(chips[i].min(), chips[j].min()), max(chips[i].max(), chips[j].max())
        assert out[k].min() >= low and out[k].max() <= high
    if dtype == "uint8":  # a shuffle rearranges pixels: the same multiset of values
        k = KINDS.index("shuffle")
        assert np.array_equal(np.sort(out[k].ravel()), np.sort(chips[sources[k, 0]].ravel()))
    again, _ = make_anomalies(chips, labels, count=12, seed=3)
    other, _ = make_anomalies(chips, labels, count=12, seed=4)
    assert np.array_equal(out, again) and not np.array_equal(out, other)
    with pytest.raises(UserError, match="cutpaste, shuffle, mix"):
        make_anomalies(chips, labels, count=2, kinds=["elastic"])


def test_anomaly_dataset_and_batch_anomalies_serve_chip_tensors() -> None:
    images = torch.randn(4, 1, 16, 16)
    items = [{"image": images[i], "label": torch.tensor(i % 2)} for i in range(4)]
    ds = AnomalyDataset(items, np.array([0, 1, 0, 1]), count=6, seed=0)
    assert len(ds) == 6 and ds[0]["image"].shape == (1, 16, 16) and ds.sources.shape == (6, 2)
    assert torch.equal(ds[5]["image"], ds[5]["image"])  # seeded per item
    batch = batch_anomalies(images, torch.tensor([0, 1, 0, 1]), 5, np.random.default_rng(0))
    assert batch.shape == (5, 1, 16, 16)
    assert all(not any(torch.equal(a, x) for x in images) for a in batch)


def _toy(seed: int = 0):
    """In-distribution: three tight clusters; anomalies: blends of two clusters (what class mixing makes)."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((3, D))
    centres[[0, 1, 2], [0, 1, 2]] = 5.0
    labels = np.repeat(np.arange(3), 40)
    x = centres[labels] + rng.normal(0.0, 0.3, (len(labels), D))
    i, j = rng.integers(0, len(x), 150), rng.integers(0, len(x), 150)
    j = np.where(labels[i] == labels[j], (j + 40) % len(x), j)
    lam = rng.uniform(0.35, 0.65, (150, 1))
    return x, labels, lam * x[i] + (1 - lam) * x[j], centres


def test_hypersphere_training_pulls_in_distribution_in_and_pushes_anomalies_out() -> None:
    x, labels, anomalies, _ = _toy()
    untrained = HypersphereDetector(steps=1, lr=1e-9, seed=1).fit(None, x, labels, anomalies=anomalies)
    trained = HypersphereDetector(steps=200, margin=1.0, seed=1).fit(None, x, labels, anomalies=anomalies)
    np.testing.assert_allclose(trained.centre, untrained.centre)  # the centre is fixed at initialisation
    before_in, before_out = untrained.distances(x), untrained.distances(anomalies)
    after_in, after_out = trained.distances(x), trained.distances(anomalies)
    assert after_in.mean() < 0.5 * before_in.mean()  # pulled in
    assert np.median(after_out) > 0.8  # pushed out to about the margin (1.0)
    assert np.median(after_out) / after_in.mean() > 2 * np.median(before_out) / before_in.mean()
    # the loss itself: zero when in-distribution sits on the centre and anomalies beyond the margin
    c = torch.zeros(2)
    assert float(hypersphere_loss(torch.zeros(3, 2), torch.full((2, 2), 5.0), c, 1.0)) == 0.0
    assert float(hypersphere_loss(torch.ones(3, 2), torch.zeros(2, 2), c, 1.0)) == pytest.approx(2.0 + 1.0)


def test_hypersphere_ranks_a_planted_cluster_above_a_far_point_and_is_deterministic() -> None:
    x, labels, anomalies, centres = _toy(seed=2)
    rng = np.random.default_rng(9)
    test = np.vstack([centres[[0, 1, 2, 0]] + rng.normal(0.0, 0.3, (4, D)), 10.0 * np.eye(D)[7:8]])
    cfg = OODConfig(hypersphere_steps=150)
    first = make_detector("hypersphere", cfg, seed=5).fit(None, x, labels, anomalies=anomalies)
    scores = first.score(embeddings=test)
    assert scores[:-1].min() > scores[-1]
    second = make_detector("hypersphere", cfg, seed=5).fit(None, x, labels, anomalies=anomalies)
    np.testing.assert_array_equal(second.score(embeddings=test), scores)


def test_hypersphere_state_round_trips_through_npz_and_needs_anomalies(tmp_path) -> None:
    x, labels, anomalies, _ = _toy(seed=3)
    detector = HypersphereDetector(dim=4, hidden=16, steps=20, seed=2, anomaly_kinds=["mix"]).fit(None, x, labels, anomalies=anomalies)
    path = save_detector(detector, tmp_path / "ood_detector.npz")
    with np.load(path, allow_pickle=False) as data:
        assert {"w1", "w2", "centre", "mean", "std"} <= set(data.files)
    loaded = load_detector(path)
    assert isinstance(loaded, HypersphereDetector) and loaded.params() == detector.params()
    np.testing.assert_array_equal(loaded.score(embeddings=anomalies), detector.score(embeddings=anomalies))
    with pytest.raises(ValueError, match="virtual anomalies"):
        HypersphereDetector(steps=2).fit(None, x, labels)
    with pytest.raises(UserError, match="hypersphere_margin"):
        HypersphereDetector(margin=0.0)
    with pytest.raises(UserError, match="anomaly_kinds"):
        HypersphereDetector(anomaly_kinds=[])
