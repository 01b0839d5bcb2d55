"""Virtual anomalies synthesised from training chips (after ASD, Li et al., AAAI 2023).

Three kinds, each built only by rearranging or convexly mixing the pixels of training chips, so an
anomaly keeps its sources' value range and dtype (uint8 stays uint8, standardised floats stay floats):
- `cutpaste`: a rectangle (30-60 % of each side) of chip b, pasted into chip a at the same place;
  b is of another class where the batch has one, so the result is a chimera of two targets;
- `shuffle`: chip a cut into a g x g grid (g in 2, 3, 4) whose tiles are permuted (never the identity);
- `mix`: heavy class mixing, lam * a + (1 - lam) * b with lam in [0.35, 0.65] (b of another class).

Chips are (..., H, W) arrays or tensors: (H, W), (C, H, W). Every choice comes from a seed, so the same
seed gives the same anomalies. `AnomalyDataset` serves anomalies of a chip dataset (for embedding them
with the model, as the hypersphere detector needs), `make_anomalies` of an array of chips, and
`batch_anomalies` of a training batch on the fly (outlier exposure).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from pipeline.errors import UserError

KINDS = ("cutpaste", "shuffle", "mix")
SHUFFLE_GRIDS = (2, 3, 4)
CUT_SIDE = (0.3, 0.6)  # pasted rectangle: this fraction of each side
MIX_LAMBDA = (0.35, 0.65)


def check_kinds(kinds: Sequence[str], key: str = "anomaly kinds") -> tuple[str, ...]:
    """`kinds` as a tuple; UserError when empty or naming an unknown kind."""
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise UserError(f"{key}={list(kinds)!r} is invalid: a non-empty list of {', '.join(KINDS)}")
    return kinds


def _as_tensor(chip: Any) -> Tensor:
    return chip if isinstance(chip, Tensor) else torch.from_numpy(np.ascontiguousarray(chip))


def cut_paste(a: Tensor, b: Tensor, rng: np.random.Generator) -> Tensor:
    """`a` with a random rectangle replaced by the same rectangle of `b`."""
    h, w = a.shape[-2:]
    bh = int(rng.integers(max(1, round(CUT_SIDE[0] * h)), max(1, round(CUT_SIDE[1] * h)) + 1))
    bw = int(rng.integers(max(1, round(CUT_SIDE[0] * w)), max(1, round(CUT_SIDE[1] * w)) + 1))
    top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    out = a.clone()
    out[..., top:top + bh, left:left + bw] = b[..., top:top + bh, left:left + bw]
    return out


def patch_shuffle(a: Tensor, rng: np.random.Generator) -> Tensor:
    """`a` cut into a g x g grid of tiles, permuted (not the identity); leftover edge pixels stay."""
    h, w = a.shape[-2:]
    grids = [g for g in SHUFFLE_GRIDS if h >= g and w >= g] or [1]
    g = int(rng.choice(grids))
    if g == 1:
        return a.clone()
    th, tw = h // g, w // g
    perm = rng.permutation(g * g)
    while (perm == np.arange(g * g)).all():
        perm = rng.permutation(g * g)
    tiles = [a[..., (t // g) * th:(t // g + 1) * th, (t % g) * tw:(t % g + 1) * tw] for t in range(g * g)]
    out = a.clone()
    for slot, t in enumerate(perm):
        r, c = divmod(slot, g)
        out[..., r * th:(r + 1) * th, c * tw:(c + 1) * tw] = tiles[int(t)]
    return out


def class_mix(a: Tensor, b: Tensor, rng: np.random.Generator) -> Tensor:
    """lam * a + (1 - lam) * b, lam in MIX_LAMBDA; integer chips are rounded back to their dtype."""
    lam = float(rng.uniform(*MIX_LAMBDA))
    mixed = lam * a.double() + (1.0 - lam) * b.double()
    if a.dtype.is_floating_point:
        return mixed.to(a.dtype)
    return mixed.round().to(a.dtype)


def synthesize(kind: str, a: Any, b: Any, rng: np.random.Generator) -> Tensor:
    """One anomaly of `kind` from chips `a` and `b` (b unused by shuffle)."""
    a, b = _as_tensor(a), _as_tensor(b)
    if kind == "cutpaste":
        return cut_paste(a, b, rng)
    if kind == "shuffle":
        return patch_shuffle(a, rng)
    if kind == "mix":
        return class_mix(a, b, rng)
    raise UserError(f"anomaly kind {kind!r} is unknown: one of {', '.join(KINDS)}")


def partners(labels: np.ndarray, first: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each position in `first`, a random other position whose label differs (any other position
    when every label is the same, itself when there is only one)."""
    labels = np.asarray(labels)
    n = len(labels)
    out = np.empty(len(first), dtype=np.int64)
    for k, i in enumerate(first):
        pool = np.flatnonzero(labels != labels[i])
        if len(pool) == 0:
            pool = np.delete(np.arange(n), i) if n > 1 else np.array([i])
        out[k] = pool[int(rng.integers(len(pool)))]
    return out


def anomaly_plan(
    labels: np.ndarray, count: int, seed: int, kinds: Sequence[str] = KINDS
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(first, second, kind ids, per-anomaly seeds) for `count` anomalies of chips with `labels`:
    every chip is a first source in turn (cycled in a seeded order), kinds alternate."""
    kinds = check_kinds(kinds)
    n = len(labels)
    if n == 0 or count < 1:
        raise ValueError(f"need chips and a positive count, got {n} chips and count {count}")
    rng = np.random.default_rng(seed)
    first = np.concatenate([rng.permutation(n) for _ in range(-(-count // n))])[:count]
    second = partners(labels, first, rng)
    kind_ids = np.arange(count) % len(kinds)
    seeds = rng.integers(0, 2**63 - 1, size=count)
    return first, second, kind_ids, seeds


def make_anomalies(
    chips: Any, labels: np.ndarray, count: int, seed: int = 0, kinds: Sequence[str] = KINDS
) -> tuple[np.ndarray, np.ndarray]:
    """(`count` anomalies in the chips' dtype (count, ...), their sources (count, 2)) from chips (N, ...)."""
    chips = np.asarray(chips)
    kinds = check_kinds(kinds)
    first, second, kind_ids, seeds = anomaly_plan(labels, count, seed, kinds)
    out = np.stack([
        synthesize(kinds[k], chips[i], chips[j], np.random.default_rng(int(s))).numpy()
        for i, j, k, s in zip(first, second, kind_ids, seeds)
    ])
    return out, np.stack([first, second], axis=1)


def batch_anomalies(
    images: Tensor, labels: Tensor, count: int, generator: np.random.Generator, kinds: Sequence[str] = KINDS
) -> Tensor:
    """`count` anomalies (count, C, H, W) from a training batch, on its device (outlier exposure)."""
    rng = generator
    first = rng.integers(0, len(images), size=count)
    second = partners(labels.detach().cpu().numpy(), first, rng)
    kind_ids = rng.integers(0, len(kinds), size=count)
    return torch.stack([synthesize(kinds[k], images[i], images[j], rng) for i, j, k in zip(first, second, kind_ids)])


class AnomalyDataset(torch.utils.data.Dataset):
    """`count` virtual anomalies of the chips of `dataset` (items with "image"), as items
    {"image", "label" (the first source's), "index"}; `sources` (count, 2) names the two chips."""

    def __init__(self, dataset: Any, labels: np.ndarray, count: int, seed: int = 0, kinds: Sequence[str] = KINDS) -> None:
        self.dataset = dataset
        self.kinds = check_kinds(kinds)
        self.first, self.second, self.kind_ids, self.seeds = anomaly_plan(np.asarray(labels), count, seed, self.kinds)

    @property
    def sources(self) -> np.ndarray:
        return np.stack([self.first, self.second], axis=1)

    def __len__(self) -> int:
        return len(self.first)

    def __getitem__(self, k: int) -> dict[str, Any]:
        a, b = self.dataset[int(self.first[k])], self.dataset[int(self.second[k])]
        image = synthesize(self.kinds[self.kind_ids[k]], a["image"], b["image"], np.random.default_rng(int(self.seeds[k])))
        return {"image": image, "label": a["label"], "index": k}


def anomaly_count(num_chips: int, per_chip: float) -> int:
    """How many anomalies `per_chip` times `num_chips` makes (at least one)."""
    return max(1, int(round(num_chips * float(per_chip))))
