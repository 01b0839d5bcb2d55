"""Samplers: class frequencies for each power and kind, per-rank draws, epochs, draw keys."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.samplers import (
    ClassBalancedSampler,
    ShuffleSampler,
    WeightedClassSampler,
    class_sample_weights,
    make_sampler,
    make_weighted_sampler,
)
from pipeline.errors import UserError

COUNTS = np.array([400, 100, 25, 9])
LABELS = np.repeat(np.arange(4), COUNTS)
DRAWS = 40_000


Drawing = WeightedClassSampler | ClassBalancedSampler | ShuffleSampler


def _class_rates(sampler: Drawing, labels: np.ndarray = LABELS) -> np.ndarray:
    items = sampler.draw_items()
    return np.bincount(labels[items], minlength=labels.max() + 1) / len(items)


def test_class_sample_weights() -> None:
    weights = class_sample_weights(np.array([0, 0, 0, 0, 1]), power=0.5)
    np.testing.assert_allclose(weights, [0.5, 0.5, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(class_sample_weights(np.array([0, 1, 1]), power=0), [1, 1, 1])


@pytest.mark.parametrize(
    ("power", "expected"),
    [
        (1.0, np.full(4, 0.25)),
        (0.5, np.sqrt(COUNTS) / np.sqrt(COUNTS).sum()),
        (0.0, COUNTS / COUNTS.sum()),
    ],
)
def test_weighted_class_frequencies(power: float, expected: np.ndarray) -> None:
    sampler = make_weighted_sampler(LABELS, power, num_samples=DRAWS, seed=3)
    assert len(sampler) == DRAWS
    np.testing.assert_allclose(_class_rates(sampler), expected, atol=0.012)


def test_balanced_draws_present_classes_uniformly() -> None:
    labels = np.repeat([0, 2, 5], [300, 20, 4])
    sampler = ClassBalancedSampler(labels, num_samples=DRAWS, seed=1)
    rates = _class_rates(sampler, labels)
    np.testing.assert_allclose(rates[[0, 2, 5]], 1 / 3, atol=0.012)
    assert rates[[1, 3, 4]].sum() == 0
    items = sampler.draw_items()
    smallest = np.bincount(items[labels[items] == 5], minlength=324)[320:]
    np.testing.assert_allclose(smallest / smallest.sum(), 0.25, atol=0.03)  # uniform inside a class


def test_uniform_kind_is_a_shuffle_of_every_item() -> None:
    sampler = make_sampler("uniform", LABELS, power=1.0, num_samples=None, seed=0)
    items = sampler.draw_items()
    assert sorted(items.tolist()) == list(range(len(LABELS)))
    assert not np.array_equal(items, np.arange(len(LABELS)))


@pytest.mark.parametrize("kind", ["weighted", "balanced"])
def test_ranks_share_the_draws_at_the_expected_rate(kind: str) -> None:
    world = 4
    samplers = [make_sampler(kind, LABELS, 1.0, DRAWS, seed=7, rank=r, world_size=world) for r in range(world)]
    draws = [s.draw_items() for s in samplers]
    assert all(len(s) == DRAWS // world and len(d) == DRAWS // world for s, d in zip(samplers, draws))
    together = np.bincount(LABELS[np.concatenate(draws)], minlength=4) / DRAWS
    np.testing.assert_allclose(together, 0.25, atol=0.012)
    for a in range(world):
        for b in range(a + 1, world):
            assert np.mean(draws[a] == draws[b]) < 0.05
    single = make_sampler(kind, LABELS, 1.0, DRAWS, seed=7)  # one process: rank 0 of 1 draws all
    assert len(single) == DRAWS


def test_shuffle_ranks_are_disjoint_and_cover_the_epoch() -> None:
    n = 120
    shares = [ShuffleSampler(n, None, seed=2, rank=r, world_size=3).draw_items() for r in range(3)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(n))
    longer = ShuffleSampler(n, 300, seed=2).draw_items()
    assert len(longer) == 300 and np.bincount(longer, minlength=n).min() >= 2


def test_epochs_and_seeds() -> None:
    sampler = make_weighted_sampler(LABELS, 0.5, num_samples=500, seed=11)
    first = sampler.draw_items()
    np.testing.assert_array_equal(first, make_weighted_sampler(LABELS, 0.5, num_samples=500, seed=11).draw_items())
    sampler.set_epoch(1)
    assert not np.array_equal(sampler.draw_items(), first)
    np.testing.assert_array_equal(sampler.draw_items(epoch=0), first)
    other_seed = make_weighted_sampler(LABELS, 0.5, num_samples=500, seed=12).draw_items()
    assert not np.array_equal(other_seed, first)


def test_iteration_yields_unique_draw_keys() -> None:
    n = len(LABELS)
    world = 2
    keys = []
    for rank in range(world):
        sampler = make_weighted_sampler(LABELS, 1.0, num_samples=5_000, seed=0, rank=rank, world_size=world)
        rank_keys = np.array(list(sampler))
        np.testing.assert_array_equal(rank_keys % n, sampler.draw_items())
        keys.append(rank_keys)
        sampler.set_epoch(1)
        keys.append(np.array(list(sampler)))
    all_keys = np.concatenate(keys)
    assert len(np.unique(all_keys)) == len(all_keys)  # repeated items, other ranks and epochs: distinct keys


def test_bad_sampler_settings() -> None:
    with pytest.raises(UserError, match="sampler.kind 'random'"):
        make_sampler("random", LABELS, 1.0, None, 0)
    with pytest.raises(UserError, match="no training samples"):
        make_sampler("balanced", np.zeros(0, dtype=np.int64), 1.0, None, 0)
    with pytest.raises(ValueError, match="rank"):
        make_sampler("weighted", LABELS, 1.0, None, 0, rank=2, world_size=2)
