"""Maximum softmax probability (Hendrycks & Gimpel 2017). Higher = more in-distribution. No fitting."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.ood.base import TemperatureDetector, check_temperature, logits_array


def msp_score(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """max softmax(logits / T) per row, float64 (N,) in (0, 1]."""
    t = check_temperature(temperature)
    z = logits_array(logits) / t
    z = z - z.max(axis=1, keepdims=True)
    return 1.0 / np.exp(z).sum(axis=1)  # the top class has z = 0, so its probability is 1 / sum(exp(z))


class MSPDetector(TemperatureDetector):
    """`msp_score` of the logits at temperature `infer.ood.temperature`."""

    name = "msp"

    def _score(self, logits: np.ndarray) -> np.ndarray:
        return msp_score(logits, self.temperature)
