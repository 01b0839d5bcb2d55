"""Mahalanobis score (Lee et al., NeurIPS 2018): class means and one shared covariance of the embeddings.

score(x) = -min_k (x - mu_k)^T P (x - mu_k), the negative squared Mahalanobis distance to the nearest
class mean (higher = more in-distribution), over the classes present in the training labels (class
ids need not be contiguous: held-out or left-out classes are simply absent).

The shared covariance S is the within-class scatter divided by N. Embeddings of a small training set
(or ReLU features with dead units) give a singular S, so S is shrunk towards a multiple of the
identity, S' = (1 - s)·S + s·(tr S / D)·I, and P = pinv(S') (a pseudo-inverse, so s = 0 still works:
directions without training variance are then ignored).
`shrinkage: auto` takes s from the Ledoit-Wolf formula (sklearn) on the class-centred embeddings.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.config import OODConfig
from pipeline.errors import UserError
from pipeline.ood.base import OODDetector, as_float_array, labels_array


def check_shrinkage(value: Any) -> float | str:
    if value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0.0 <= value <= 1.0:
        raise UserError(f"infer.ood.mahalanobis_shrinkage={value!r} is invalid: auto or a number in [0, 1]")
    return float(value)


def pseudo_inverse(sym: np.ndarray) -> np.ndarray:
    """Moore-Penrose inverse of a symmetric positive semi-definite matrix, by one eigendecomposition;
    eigenvalues below D·eps·max (numerical zeros of a singular matrix) are dropped, as matrix_rank does."""
    eigvals, eigvecs = np.linalg.eigh(sym)
    keep = eigvals > eigvals.max() * len(sym) * np.finfo(np.float64).eps
    vecs = eigvecs[:, keep]
    return (vecs / eigvals[keep]) @ vecs.T


class MahalanobisDetector(OODDetector):
    """Negative squared Mahalanobis distance to the nearest class mean (shared, shrunk covariance)."""

    name = "mahalanobis"
    uses = "embeddings"
    needs_fit = True
    _array_names = ("classes", "means", "precision", "shrinkage_used")

    def __init__(self, shrinkage: float | str = "auto") -> None:
        super().__init__()
        self.shrinkage = check_shrinkage(shrinkage)
        self.classes = np.zeros(0, np.int64)  # (K,) class ids present in training
        self.means = np.zeros((0, 0))  # (K, D)
        self.precision = np.zeros((0, 0))  # (D, D)
        self.shrinkage_used = np.float64(0.0)  # the s actually applied (Ledoit-Wolf's when auto)

    def params(self) -> dict[str, Any]:
        return {"shrinkage": self.shrinkage}

    @classmethod
    def from_config(cls, ood_cfg: OODConfig, seed: int = 0, **overrides: Any) -> "MahalanobisDetector":
        return cls(**{"shrinkage": ood_cfg.mahalanobis_shrinkage, **overrides})

    def _fit(self, logits: Any, embeddings: Any, labels: Any, head: Any) -> None:
        x = as_float_array(embeddings, "embeddings")
        y = labels_array(labels, len(x))
        self.classes = np.unique(y)
        self.means = np.stack([x[y == c].mean(axis=0) for c in self.classes])
        centred = x - self.means[np.searchsorted(self.classes, y)]
        cov = centred.T @ centred / len(x)
        from sklearn.covariance import ledoit_wolf_shrinkage  # here, not at import: sklearn is slow to import

        s = ledoit_wolf_shrinkage(centred, assume_centered=True) if self.shrinkage == "auto" else self.shrinkage
        target = np.trace(cov) / cov.shape[0]
        shrunk = (1.0 - s) * cov + s * target * np.eye(cov.shape[0])
        self.precision = pseudo_inverse(shrunk)
        self.shrinkage_used = np.float64(s)

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distances (N, K) to every class mean."""
        x = as_float_array(embeddings, "embeddings")
        if x.shape[1] != self.means.shape[1]:
            raise ValueError(f"embeddings have {x.shape[1]} dims, the detector was fitted on {self.means.shape[1]}")
        out = np.empty((len(x), len(self.means)))
        for k, mu in enumerate(self.means):
            diff = x - mu
            out[:, k] = np.einsum("nd,nd->n", diff @ self.precision, diff)
        return out

    def _score(self, embeddings: np.ndarray) -> np.ndarray:
        return -self.distances(embeddings).min(axis=1)
