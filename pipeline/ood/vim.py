"""ViM, virtual-logit matching (Wang et al., CVPR 2022, "ViM: Out-Of-Distribution with Virtual-logit
Matching"), as in the authors' code (github.com/haoqiwang/vim).

Fit, on training embeddings x (N, D) and the model's linear head (W (C, D), bias b (C,)):
- origin u = -pinv(W) b (the point the head maps to all-zero logits); centred features x - u;
- principal subspace: the `dim` leading eigenvectors of the (uncentred, /N) covariance of x - u; the
  residual space R (D, D - dim) is spanned by the other eigenvectors;
- alpha = mean over training chips of the max logit / mean of the residual norm ||(x - u) R||.

score(x) = -(alpha·||(x - u) R|| - logsumexp(l)) = energy - virtual logit, with logits l = x W^T + b:
higher = more in-distribution.

The logits are recomputed from the embeddings with the stored head, both when fitting and when
scoring, so ViM needs only embeddings and the head (`fit(..., head=(W, b))`; `pipeline.ood.fit.head_of`
reads them off the model). Because the head is linear, the logits of TTA-averaged embeddings equal
the TTA-averaged logits. `dim: auto` follows the paper's choices: 1000 for D >= 1500, 512 for
D >= 768, else D // 2.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.config import OODConfig
from pipeline.errors import UserError
from pipeline.ood.base import OODDetector, as_float_array, as_vector, check_positive_int


def auto_dim(d: int) -> int:
    """The principal-subspace dimension ViM's authors used for a feature dimension `d`."""
    if d >= 1500:
        return 1000
    if d >= 768:
        return 512
    return max(1, d // 2)


def logsumexp(z: np.ndarray) -> np.ndarray:
    peak = z.max(axis=1)
    return peak + np.log(np.exp(z - peak[:, None]).sum(axis=1))


class ViMDetector(OODDetector):
    """Energy minus the alpha-scaled norm of the embedding's residual off the principal subspace."""

    name = "vim"
    uses = "embeddings"
    needs_fit = True
    _array_names = ("weight", "bias", "origin", "residual_basis", "alpha")

    def __init__(self, dim: int | str = "auto") -> None:
        super().__init__()
        self.dim = dim if dim == "auto" else check_positive_int(dim, "infer.ood.vim_dim")
        self.weight = np.zeros((0, 0))  # (C, D)
        self.bias = np.zeros(0)  # (C,)
        self.origin = np.zeros(0)  # u (D,)
        self.residual_basis = np.zeros((0, 0))  # R (D, D - dim)
        self.alpha = np.float64(1.0)

    def params(self) -> dict[str, Any]:
        return {"dim": self.dim}

    @classmethod
    def from_config(cls, ood_cfg: OODConfig, seed: int = 0, **overrides: Any) -> "ViMDetector":
        return cls(**{"dim": ood_cfg.vim_dim, **overrides})

    def _fit(self, logits: Any, embeddings: Any, labels: Any, head: Any) -> None:
        if head is None:
            raise ValueError("the vim detector needs the classifier head: fit(..., head=(weight, bias))")
        x = as_float_array(embeddings, "embeddings")
        weight = as_float_array(head[0], "head weight")
        bias = as_vector(head[1], "head bias")
        if weight.shape[1] != x.shape[1] or bias.shape != (weight.shape[0],):
            raise ValueError(f"head {weight.shape} / {bias.shape} does not fit embeddings of {x.shape[1]} dims")
        d = x.shape[1]
        dim = auto_dim(d) if self.dim == "auto" else self.dim
        if dim >= d:
            raise UserError(f"infer.ood.vim_dim={dim} must be below the embedding dimension {d}")
        self.weight, self.bias = weight, bias
        self.origin = -np.linalg.pinv(weight) @ bias
        centred = x - self.origin
        eigvals, eigvecs = np.linalg.eigh(centred.T @ centred / len(x))  # ascending eigenvalues
        self.residual_basis = np.ascontiguousarray(eigvecs[:, : d - dim])  # all but the `dim` largest
        residual = np.linalg.norm(centred @ self.residual_basis, axis=1)
        self.alpha = np.float64(self._logits(x).max(axis=1).mean() / max(residual.mean(), 1e-12))

    def _logits(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias

    def virtual_logit(self, embeddings: Any) -> np.ndarray:
        """alpha·||(x - u) R|| per chip."""
        x = as_float_array(embeddings, "embeddings")
        return float(self.alpha) * np.linalg.norm((x - self.origin) @ self.residual_basis, axis=1)

    def _score(self, embeddings: np.ndarray) -> np.ndarray:
        if embeddings.shape[1] != self.weight.shape[1]:
            raise ValueError(f"embeddings have {embeddings.shape[1]} dims, the detector was fitted on {self.weight.shape[1]}")
        return logsumexp(self._logits(embeddings)) - self.virtual_logit(embeddings)
