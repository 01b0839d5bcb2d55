"""Energy score (Liu et al. 2020): T·logsumexp(logits / T), the negative free energy.

Higher = more in-distribution: large, peaked logits give a high score, small flat ones a low score.
Needs no fitting.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.ood.base import TemperatureDetector, check_temperature, logits_array


def energy_score(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """T·logsumexp(logits / T) per row, float64 (N,), computed stably (max subtracted first)."""
    t = check_temperature(temperature)
    z = logits_array(logits) / t
    peak = z.max(axis=1)
    return t * (peak + np.log(np.exp(z - peak[:, None]).sum(axis=1)))


class EnergyDetector(TemperatureDetector):
    """`energy_score` of the logits at temperature `infer.ood.temperature`."""

    name = "energy"

    def _score(self, logits: np.ndarray) -> np.ndarray:
        return energy_score(logits, self.temperature)
