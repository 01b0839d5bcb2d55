"""Energy score (Liu et al. 2020): T·logsumexp(logits / T), the negative free energy.

Higher = more in-distribution: large, peaked logits give a high score, small flat ones a low score.
Needs no fitting.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.ood.base import OODDetector, check_temperature, logits_array


def energy_score(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """T·logsumexp(logits / T) per row, float64 (N,), computed stably (max subtracted first)."""
    t = check_temperature(temperature)
    z = logits_array(logits) / t
    peak = z.max(axis=1)
    return t * (peak + np.log(np.exp(z - peak[:, None]).sum(axis=1)))


class EnergyDetector(OODDetector):
    """`energy_score` of the logits at temperature `infer.ood.temperature`."""

    name = "energy"

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)

    def params(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    @classmethod
    def from_config(cls, ood_cfg: dict[str, Any], seed: int = 0, **overrides: Any) -> "EnergyDetector":
        return cls(**{"temperature": ood_cfg.get("temperature", 1.0), **overrides})

    def _score(self, logits: np.ndarray) -> np.ndarray:
        return energy_score(logits, self.temperature)
