"""Hypersphere score with virtual anomalies (after ASD, Li et al., AAAI 2023, applied to chips).

A small projection f (2-layer MLP without bias terms, on standardised frozen embeddings) is trained so
that in-distribution embeddings lie close to a fixed centre c (Deep SVDD, Ruff et al. 2018: c = the
mean projected training embedding at initialisation, never trained), while the embeddings of virtual
anomalies (`pipeline.ood.anomalies`) are pushed beyond a margin m:

    loss = mean_in ||f(x) - c||^2  +  mean_anomalies max(0, m - ||f(a) - c||)^2

Without biases and with c fixed, f cannot map everything to c for free; the hinge on the anomalies
keeps the sphere from collapsing to a point (the trivial Deep SVDD solution). score = -||f(x) - c||:
higher = more in-distribution. Fitting is a few hundred seeded Adam steps on minibatches of cached
embeddings on the CPU (one thread: deterministic); scoring is numpy on the saved arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import OODConfig
from pipeline.errors import UserError
from pipeline.ood.anomalies import KINDS, check_kinds
from pipeline.ood.base import OODDetector, as_float_array, check_positive_int

NEGATIVE_SLOPE = 0.1  # leaky ReLU between the two layers
BATCH = 256  # in-distribution and anomaly embeddings per Adam step


def _leaky_relu(z: np.ndarray) -> np.ndarray:
    return np.where(z > 0, z, NEGATIVE_SLOPE * z)


def hypersphere_loss(
    in_dist: torch.Tensor, anomalies: torch.Tensor, centre: torch.Tensor, margin: float
) -> torch.Tensor:
    """mean ||in - c||^2 + mean max(0, margin - ||anomaly - c||)^2 of projected embeddings."""
    d_in = (in_dist - centre).pow(2).sum(dim=1)
    d_out = (anomalies - centre).pow(2).sum(dim=1).clamp_min(1e-12).sqrt()
    return d_in.mean() + F.relu(margin - d_out).pow(2).mean()


class HypersphereDetector(OODDetector):
    """Minus the distance to the centre of a Deep SVDD projection trained against virtual anomalies."""

    name = "hypersphere"
    uses = "embeddings"
    needs_fit = True
    needs_anomalies = True
    _array_names = ("mean", "std", "w1", "w2", "centre")

    def __init__(
        self, dim: int = 32, hidden: int = 128, margin: float = 1.0, steps: int = 300, lr: float = 0.003,
        anomalies_per_chip: float = 1.0, anomaly_kinds: list[str] | tuple[str, ...] = KINDS, seed: int = 0,
    ) -> None:
        super().__init__()
        self.dim = check_positive_int(dim, "infer.ood.hypersphere_dim")
        self.hidden = check_positive_int(hidden, "infer.ood.hypersphere_hidden")
        self.steps = check_positive_int(steps, "infer.ood.hypersphere_steps")
        for key, value in (("hypersphere_margin", margin), ("hypersphere_lr", lr), ("anomalies_per_chip", anomalies_per_chip)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
                raise UserError(f"infer.ood.{key}={value!r} is invalid: a positive number")
        self.margin, self.lr, self.anomalies_per_chip = float(margin), float(lr), float(anomalies_per_chip)
        self.anomaly_kinds = list(check_kinds(anomaly_kinds, "infer.ood.anomaly_kinds"))
        self.seed = int(seed)
        self.mean = np.zeros(0)
        self.std = np.ones(0)
        self.w1 = np.zeros((0, 0))  # (D, hidden)
        self.w2 = np.zeros((0, 0))  # (hidden, dim)
        self.centre = np.zeros(0)  # (dim,)

    def params(self) -> dict[str, Any]:
        return {"dim": self.dim, "hidden": self.hidden, "margin": self.margin, "steps": self.steps, "lr": self.lr,
                "anomalies_per_chip": self.anomalies_per_chip, "anomaly_kinds": self.anomaly_kinds, "seed": self.seed}

    @classmethod
    def from_config(cls, ood_cfg: OODConfig, seed: int = 0, **overrides: Any) -> "HypersphereDetector":
        params = {"dim": ood_cfg.hypersphere_dim, "hidden": ood_cfg.hypersphere_hidden,
                  "margin": ood_cfg.hypersphere_margin, "steps": ood_cfg.hypersphere_steps, "lr": ood_cfg.hypersphere_lr,
                  "anomalies_per_chip": ood_cfg.anomalies_per_chip, "anomaly_kinds": list(ood_cfg.anomaly_kinds),
                  "seed": seed}
        return cls(**{**params, **overrides})

    def project(self, embeddings: np.ndarray) -> np.ndarray:
        """f(x) of raw embeddings (N, D) -> (N, dim), float64."""
        z = (np.asarray(embeddings, np.float64) - self.mean) / self.std
        return _leaky_relu(z @ self.w1) @ self.w2

    def distances(self, embeddings: np.ndarray) -> np.ndarray:
        return np.linalg.norm(self.project(embeddings) - self.centre, axis=1)

    def _fit(self, logits: Any, embeddings: Any, labels: Any, head: Any, anomalies: Any = None) -> None:
        x = as_float_array(embeddings, "embeddings")
        if anomalies is None:
            raise ValueError("the hypersphere detector needs the embeddings of virtual anomalies (anomalies=)")
        a = as_float_array(anomalies, "anomaly embeddings")
        if a.shape[1] != x.shape[1]:
            raise ValueError(f"anomaly embeddings have {a.shape[1]} dims, the training embeddings {x.shape[1]}")
        self.mean, self.std = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
        rng = np.random.default_rng(self.seed)
        d = x.shape[1]
        w1 = rng.normal(0.0, np.sqrt(2.0 / d), size=(d, self.hidden))
        w2 = rng.normal(0.0, np.sqrt(1.0 / self.hidden), size=(self.hidden, self.dim))
        self.w1, self.w2 = w1, w2
        self.centre = self.project(x).mean(axis=0)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # small matrices; one thread is also what makes the steps reproducible
        try:
            self._train(((x - self.mean) / self.std).astype(np.float32), ((a - self.mean) / self.std).astype(np.float32), rng)
        finally:
            torch.set_num_threads(threads)

    def _train(self, x: np.ndarray, a: np.ndarray, rng: np.random.Generator) -> None:
        xs, as_ = torch.from_numpy(x), torch.from_numpy(a)
        w1 = torch.tensor(self.w1, dtype=torch.float32, requires_grad=True)
        w2 = torch.tensor(self.w2, dtype=torch.float32, requires_grad=True)
        centre = torch.tensor(self.centre, dtype=torch.float32)
        optimizer = torch.optim.Adam([w1, w2], lr=self.lr)
        for _ in range(self.steps):
            bi = torch.from_numpy(rng.integers(0, len(xs), size=min(BATCH, len(xs))))
            ba = torch.from_numpy(rng.integers(0, len(as_), size=min(BATCH, len(as_))))
            optimizer.zero_grad()
            project = lambda z: F.leaky_relu(z @ w1, NEGATIVE_SLOPE) @ w2  # noqa: E731
            loss = hypersphere_loss(project(xs[bi]), project(as_[ba]), centre, self.margin)
            loss.backward()
            optimizer.step()
        self.w1, self.w2 = w1.detach().double().numpy(), w2.detach().double().numpy()

    def _score(self, embeddings: np.ndarray) -> np.ndarray:
        if embeddings.shape[1] != self.w1.shape[0]:
            raise ValueError(f"embeddings have {embeddings.shape[1]} dims, the hypersphere head {self.w1.shape[0]}")
        return -self.distances(embeddings)
