"""k-nearest-neighbour score on normalised embeddings (Sun et al., ICML 2022, "Out-of-Distribution
Detection with Deep Nearest Neighbors").

Embeddings are L2-normalised; the score of a chip is the cosine similarity to its k-th nearest
training embedding (exact search, faiss `IndexFlatIP`). Higher = more in-distribution. Sun et al.'s
score is minus the Euclidean distance between normalised vectors, sqrt(2 - 2·cos): a decreasing
function of the similarity, so both rank chips identically (same AUROC). The paper picks k on
validation (k = 50 on CIFAR-10); on MSTAR-size training sets k = 1 did best in issue 12's
measurements, so `infer.ood.knn_k` is a config key and `stages.select_ood` compares several.

`max_per_class` keeps at most that many training embeddings of each class (seeded random choice),
which bounds the saved bank on the 455k-chip real training set without starving the rare classes.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from pipeline.config import OODConfig
from pipeline.errors import UserError
from pipeline.ood.base import OODDetector, as_float_array, check_positive_int, labels_array


def normalised(embeddings: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32 (zero rows stay zero)."""
    x = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def capped_rows(labels: np.ndarray, max_per_class: int | None, seed: int) -> np.ndarray:
    """Sorted row positions keeping at most `max_per_class` rows of each label (seeded choice)."""
    if max_per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        keep.append(rng.choice(rows, max_per_class, replace=False) if len(rows) > max_per_class else rows)
    return np.sort(np.concatenate(keep))


class KNNDetector(OODDetector):
    """Cosine similarity to the k-th nearest (normalised) training embedding."""

    name = "knn"
    uses = "embeddings"
    needs_fit = True
    _array_names = ("bank",)

    def __init__(self, k: int = 1, max_per_class: int | None = None, seed: int = 0) -> None:
        super().__init__()
        self.k = check_positive_int(k, "infer.ood.knn_k")
        self.max_per_class = check_positive_int(max_per_class, "infer.ood.knn_max_per_class", allow_none=True)
        self.seed = int(seed)
        self.bank = np.zeros((0, 0), np.float32)  # normalised training embeddings (M, D)
        self._index: faiss.Index | None = None

    def params(self) -> dict[str, Any]:
        return {"k": self.k, "max_per_class": self.max_per_class, "seed": self.seed}

    @classmethod
    def from_config(cls, ood_cfg: OODConfig, seed: int = 0, **overrides: Any) -> "KNNDetector":
        params = {"k": ood_cfg.knn_k, "max_per_class": ood_cfg.knn_max_per_class, "seed": seed}
        return cls(**{**params, **overrides})

    def _fit(self, logits: Any, embeddings: Any, labels: Any, head: Any) -> None:
        x = as_float_array(embeddings, "embeddings")
        rows = capped_rows(labels_array(labels, len(x)), self.max_per_class, self.seed)
        if len(rows) < self.k:
            raise UserError(f"infer.ood.knn_k={self.k} exceeds the {len(rows)} training embeddings")
        self.bank = normalised(x[rows])
        self._loaded()

    def _loaded(self) -> None:
        self.bank = np.ascontiguousarray(self.bank, dtype=np.float32)
        self._index = faiss.IndexFlatIP(self.bank.shape[1])
        self._index.add(self.bank)

    def _score(self, embeddings: np.ndarray) -> np.ndarray:
        if embeddings.shape[1] != self.bank.shape[1]:
            raise ValueError(f"embeddings have {embeddings.shape[1]} dims, the KNN bank {self.bank.shape[1]}")
        similarities, _ = self._index.search(normalised(embeddings), self.k)  # (N, k), descending
        return similarities[:, self.k - 1].astype(np.float64)
