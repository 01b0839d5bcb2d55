"""Maximum softmax probability (Hendrycks & Gimpel 2017). Higher = more in-distribution. No fitting."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.ood.base import OODDetector, check_temperature, logits_array


def msp_score(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """max softmax(logits / T) per row, float64 (N,) in (0, 1]."""
    t = check_temperature(temperature)
    z = logits_array(logits) / t
    z = z - z.max(axis=1, keepdims=True)
    return 1.0 / np.exp(z).sum(axis=1)  # the top class has z = 0, so its probability is 1 / sum(exp(z))


class MSPDetector(OODDetector):
    """`msp_score` of the logits at temperature `infer.ood.temperature`."""

    name = "msp"

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)

    def params(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    @classmethod
    def from_config(cls, ood_cfg: dict[str, Any], seed: int = 0, **overrides: Any) -> "MSPDetector":
        return cls(**{"temperature": ood_cfg.get("temperature", 1.0), **overrides})

    def _score(self, logits: np.ndarray) -> np.ndarray:
        return msp_score(logits, self.temperature)
