"""Training samplers against the long tail: weighted by class count, class-balanced, or plain shuffle.

Every sampler draws `num_samples // world_size` samples per rank per epoch, reproducibly from (seed,
epoch): the random samplers from a Generator seeded by (seed, epoch, rank), so ranks draw different
samples; the shuffle sampler from one permutation per (seed, epoch) that ranks share out. One process
works the same (rank 0 of 1). Call `set_epoch(e)` before each epoch.

Samplers yield *draw keys*, not bare item indices: key = item + n_items * draw, where draw numbers
every draw of every epoch on every rank uniquely. The datasets in pipeline.data.datasets read item
`key % len` and seed that draw's augmentation with the key, so an item drawn several times in one
epoch (as minority-class items are) gets a different augmentation each time, and augmentation changes
from epoch to epoch even in persistent DataLoader workers that never see `dataset.set_epoch`.
`draw_items()` gives the bare items.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

from pipeline.errors import UserError

SAMPLER_KINDS = ("weighted", "balanced", "uniform")


def class_sample_weights(labels: np.ndarray, power: float) -> np.ndarray:
    """Per-sample weight count[label] ** -power: 1 = classes equally likely, 0 = natural frequency."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels).astype(np.float64)
    return counts[labels] ** -float(power)


class _RankedSampler(Sampler[int], ABC):
    """Shared contract: per-rank share of num_samples, (seed, epoch, rank) seeding, draw keys."""

    def __init__(
        self, num_items: int, num_samples: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if num_items < 1:
            raise UserError("the sampler got no training samples: check the dataset and holdout_classes")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.num_items = num_items
        self.num_samples = num_items if num_samples is None else int(num_samples)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // self.world_size

    def _rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, epoch, self.rank))

    @abstractmethod
    def draw_items(self, epoch: int | None = None) -> np.ndarray:
        """The item indices this rank draws in `epoch` (default: the current epoch)."""

    def draw_keys(self, epoch: int | None = None) -> np.ndarray:
        """Draw keys of this rank's epoch: item + num_items * (draw number, unique over epochs and ranks)."""
        epoch = self.epoch if epoch is None else epoch
        items = self.draw_items(epoch)
        position = epoch * len(self) + np.arange(len(items), dtype=np.int64)
        return items + self.num_items * (position * self.world_size + self.rank)

    def __iter__(self) -> Iterator[int]:
        return iter(self.draw_keys().tolist())


class WeightedClassSampler(_RankedSampler):
    """Draws items with replacement, with probability proportional to per-sample weights."""

    def __init__(
        self, weights: np.ndarray, num_samples: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        weights = np.asarray(weights, dtype=np.float64)
        super().__init__(len(weights), num_samples, seed, rank, world_size)
        if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError("sampler weights must be finite, >= 0 and not all 0")
        self._cumulative = np.cumsum(weights / weights.sum())

    def draw_items(self, epoch: int | None = None) -> np.ndarray:
        rng = self._rng(self.epoch if epoch is None else epoch)
        picks = np.searchsorted(self._cumulative, rng.random(len(self)) * self._cumulative[-1], side="right")
        return np.minimum(picks, self.num_items - 1).astype(np.int64)


class ClassBalancedSampler(_RankedSampler):
    """Draws a class uniformly among the classes present, then an item uniformly within it."""

    def __init__(
        self, labels: np.ndarray, num_samples: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        super().__init__(len(labels), num_samples, seed, rank, world_size)
        self._by_class = np.argsort(labels, kind="stable")
        _, self._starts, self._counts = np.unique(labels[self._by_class], return_index=True, return_counts=True)

    def draw_items(self, epoch: int | None = None) -> np.ndarray:
        rng = self._rng(self.epoch if epoch is None else epoch)
        classes = rng.integers(len(self._counts), size=len(self))
        offsets = (rng.random(len(self)) * self._counts[classes]).astype(np.int64)
        return self._by_class[self._starts[classes] + offsets]


class ShuffleSampler(_RankedSampler):
    """Natural frequency without replacement: one shuffle per pass, ranks take interleaved shares."""

    def draw_items(self, epoch: int | None = None) -> np.ndarray:
        rng = np.random.default_rng((self.seed, self.epoch if epoch is None else epoch))
        total = len(self) * self.world_size
        passes = -(-total // self.num_items)
        order = np.concatenate([rng.permutation(self.num_items) for _ in range(passes)])
        return order[self.rank : total : self.world_size]


def make_weighted_sampler(
    labels: np.ndarray,
    power: float,
    num_samples: int | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> WeightedClassSampler:
    """WeightedClassSampler with weights count[label] ** -power."""
    return WeightedClassSampler(class_sample_weights(labels, power), num_samples, seed, rank, world_size)


def make_sampler(
    kind: str,
    labels: np.ndarray,
    power: float,
    num_samples: int | None,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> _RankedSampler:
    """The sampler a config's `sampler.kind` names: weighted | balanced | uniform."""
    if kind == "weighted":
        return make_weighted_sampler(labels, power, num_samples, seed, rank, world_size)
    if kind == "balanced":
        return ClassBalancedSampler(labels, num_samples, seed, rank, world_size)
    if kind == "uniform":
        return ShuffleSampler(len(labels), num_samples, seed, rank, world_size)
    raise UserError(f"sampler.kind '{kind}' is unknown: expected one of {', '.join(SAMPLER_KINDS)}")
