"""Out-of-distribution scores from logits, one detector per module (pytorch-ood style).

Every detector is `score(logits, temperature=1.0) -> np.ndarray`: logits (N, C) as a numpy array or
a torch tensor in, float64 scores (N,) out, and a HIGHER score means MORE IN-DISTRIBUTION (the
competition's convention: the submission's `score` column is used as is).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from pipeline.errors import UserError

OODScore = Callable[..., np.ndarray]


def logits_array(logits: Any) -> np.ndarray:
    """Logits (N, C) from a numpy array or a (any device, any dtype) torch tensor, as float64 numpy."""
    if hasattr(logits, "detach"):  # a torch tensor
        logits = logits.detach().to("cpu").double().numpy()
    array = np.asarray(logits, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"logits must be (N, C) with C >= 1, got shape {array.shape}")
    return array


def check_temperature(temperature: float) -> float:
    """The temperature as a float; UserError unless it is a positive finite number."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.number)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise UserError(f"infer.ood.temperature={temperature!r} is invalid: a positive number such as 1.0")
    return float(temperature)


# The detectors import the helpers above, so they are imported after them.
from pipeline.ood.energy import energy_score  # noqa: E402
from pipeline.ood.maxlogit import maxlogit_score  # noqa: E402
from pipeline.ood.msp import msp_score  # noqa: E402

OOD_SCORES: dict[str, OODScore] = {
    "energy": energy_score,
    "msp": msp_score,
    "maxlogit": maxlogit_score,
}


def ood_score(logits: Any, method: str = "energy", temperature: float = 1.0) -> np.ndarray:
    """Scores (N,) float64 of the detector `method`; higher = more in-distribution."""
    if method not in OOD_SCORES:
        raise UserError(f"infer.ood.method '{method}' is unknown: choose one of {', '.join(OOD_SCORES)}")
    return OOD_SCORES[method](logits, temperature=temperature)


__all__ = ["OOD_SCORES", "OODScore", "check_temperature", "energy_score", "logits_array",
           "maxlogit_score", "msp_score", "ood_score"]
