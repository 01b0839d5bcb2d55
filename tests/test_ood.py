"""OOD detectors: values by hand, and the direction (higher = more in-distribution)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from pipeline.metrics import auroc
from pipeline.ood import OOD_SCORES, ood_score
from pipeline.ood.energy import energy_score
from pipeline.ood.maxlogit import maxlogit_score
from pipeline.ood.msp import msp_score


def _planted_logits(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """20 in-distribution rows (large, peaked logits) then 5 OOD rows (small, flat logits)."""
    rng = np.random.default_rng(seed)
    in_dist = rng.normal(0.0, 0.5, (20, 10))
    in_dist[np.arange(20), rng.integers(0, 10, 20)] += 8.0
    ood = rng.normal(0.0, 0.1, (5, 10))
    return np.concatenate([in_dist, ood]), np.r_[np.ones(20, bool), np.zeros(5, bool)]


@pytest.mark.parametrize("method", sorted(OOD_SCORES))
def test_higher_score_means_in_distribution(method: str) -> None:
    logits, is_in = _planted_logits()
    scores = ood_score(logits, method, temperature=1.0)
    assert scores.dtype == np.float64 and scores.shape == (25,)
    assert scores[is_in].min() > scores[~is_in].max()
    assert auroc(is_in, scores) == 1.0


@pytest.mark.parametrize("method", sorted(OOD_SCORES))
def test_tensor_and_numpy_inputs_agree(method: str) -> None:
    logits, _ = _planted_logits(seed=1)
    from_tensor = ood_score(torch.tensor(logits, dtype=torch.float32), method, 2.0)
    np.testing.assert_allclose(from_tensor, ood_score(logits.astype(np.float32), method, 2.0), rtol=1e-6)


def test_energy_by_hand() -> None:
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-5.0, 10.0, 2.0]])
    for t in (1.0, 2.0, 0.5):
        by_hand = [t * math.log(sum(math.exp(v / t) for v in row)) for row in logits]
        np.testing.assert_allclose(energy_score(logits, temperature=t), by_hand, rtol=1e-12)
    big = np.array([[1000.0, 999.0]])  # naive exp overflows; the stable form does not
    np.testing.assert_allclose(energy_score(big), [1000.0 + math.log1p(math.exp(-1.0))], rtol=1e-12)


def test_msp_and_maxlogit_by_hand() -> None:
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    expected_msp = [math.exp(3) / (math.exp(1) + math.exp(2) + math.exp(3)), 1 / 3]
    np.testing.assert_allclose(msp_score(logits), expected_msp, rtol=1e-12)
    np.testing.assert_allclose(
        msp_score(logits, temperature=2.0), [math.exp(1.5) / sum(math.exp(v / 2) for v in (1, 2, 3)), 1 / 3]
    )
    np.testing.assert_array_equal(maxlogit_score(logits), [3.0, 0.0])
    np.testing.assert_array_equal(maxlogit_score(logits, temperature=5.0), [3.0, 0.0])


def test_unknown_method_and_bad_temperature_are_user_errors() -> None:
    logits, _ = _planted_logits()
    with pytest.raises(UserError, match="energy, msp, maxlogit"):
        ood_score(logits, "mahalanobis")
    for bad in (0.0, -1.0, float("nan"), "warm"):
        with pytest.raises(UserError, match="temperature"):
            ood_score(logits, "energy", bad)  # type: ignore[arg-type]
