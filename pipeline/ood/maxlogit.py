"""Maximum logit (Hendrycks et al. 2022). Higher = more in-distribution. No fitting."""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.ood.base import OODDetector, check_temperature, logits_array


def maxlogit_score(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """max logit per row, float64 (N,); `temperature` is checked but cancels out (T·max(l/T) = max l)."""
    check_temperature(temperature)
    return logits_array(logits).max(axis=1)


class MaxLogitDetector(OODDetector):
    """`maxlogit_score` of the logits (no parameters)."""

    name = "maxlogit"

    def _score(self, logits: np.ndarray) -> np.ndarray:
        return maxlogit_score(logits)
