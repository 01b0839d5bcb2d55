"""Out-of-distribution detectors, one per module, behind `OODDetector` (pipeline/ood/base.py), where
the sign convention is stated: HIGHER score = MORE IN-DISTRIBUTION.

- `DETECTORS`: name -> detector class (energy, msp, maxlogit need no fitting; knn, mahalanobis, vim
  are fitted on the training split's TTA-averaged embeddings; hypersphere also on the embeddings of
  virtual anomalies of those chips, `pipeline.ood.anomalies`). `make_detector(name, ood_cfg)` builds
  one from the `infer.ood` config section; `save_detector` / `load_detector` keep a fitted one in a
  single .npz (arrays plus a JSON header, loaded with allow_pickle=False: no code runs on load).
- `OOD_SCORES` / `ood_score`: the three logit scores as plain functions `score(logits, temperature)`.

Why not pytorch-ood (0.4.0; it would install beside torch 2.14 without pulling another torch): its
detectors keep their fitted state in torch tensors and sklearn objects with no save format but
pickle; its Mahalanobis asserts class ids 0..C-1 are all present (held-out and left-out classes make
gaps) and inverts the covariance with a 1e-6 ridge instead of shrinkage/pseudo-inverse; its KNN uses
sklearn rather than faiss, and its scores are outlier scores (the opposite sign). Each detector here
is a few lines of numpy/faiss that follow the same papers (its KNN and ViM formulas were checked
against pytorch-ood's source).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.config import OODConfig
from pipeline.errors import UserError
from pipeline.ood.base import OODDetector, check_temperature, logits_array
from pipeline.ood.energy import EnergyDetector, energy_score
from pipeline.ood.hypersphere import HypersphereDetector
from pipeline.ood.knn import KNNDetector
from pipeline.ood.mahalanobis import MahalanobisDetector
from pipeline.ood.maxlogit import MaxLogitDetector, maxlogit_score
from pipeline.ood.msp import MSPDetector, msp_score
from pipeline.ood.vim import ViMDetector

OODScore = Callable[..., np.ndarray]

OOD_SCORES: dict[str, OODScore] = {
    "energy": energy_score,
    "msp": msp_score,
    "maxlogit": maxlogit_score,
}

DETECTORS: dict[str, type[OODDetector]] = {
    cls.name: cls
    for cls in (EnergyDetector, MSPDetector, MaxLogitDetector, KNNDetector, MahalanobisDetector, ViMDetector,
                HypersphereDetector)
}
AUTO = "auto"  # infer.ood.method: take the method stages.select_ood chose (weights/ood_choice.json)


def ood_score(logits: Any, method: str = "energy", temperature: float = 1.0) -> np.ndarray:
    """Scores (N,) float64 of the logit score `method`; higher = more in-distribution."""
    if method not in OOD_SCORES:
        raise UserError(f"infer.ood.method '{method}' is unknown: choose one of {', '.join(OOD_SCORES)}")
    return OOD_SCORES[method](logits, temperature=temperature)


def detector_class(name: str) -> type[OODDetector]:
    if name not in DETECTORS:
        raise UserError(f"infer.ood.method '{name}' is unknown: choose one of {', '.join(DETECTORS)} or {AUTO}")
    return DETECTORS[name]


def make_detector(name: str, ood_cfg: OODConfig | None = None, seed: int = 0, **overrides: Any) -> OODDetector:
    """The (unfitted) detector `name` with its parameters from `ood_cfg` (infer.ood), then `overrides`."""
    return detector_class(name).from_config(ood_cfg or OODConfig(), seed=seed, **overrides)


def detector_from_state(state: dict[str, Any]) -> OODDetector:
    return detector_class(str(state.get("name"))).from_state(state)


_HEADER = "__state__"


def save_detector(detector: OODDetector, path: str | Path) -> Path:
    """Write the fitted detector to `path` (.npz: its arrays plus a JSON header), atomically."""
    path = Path(path)
    state = detector.state()
    arrays = state.pop("arrays")
    buffer = io.BytesIO()
    np.savez(buffer, **{_HEADER: np.array(json.dumps(state, sort_keys=True))}, **arrays)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
    return path


def load_detector(path: str | Path) -> OODDetector:
    """The fitted detector saved by `save_detector` (no pickle is ever loaded)."""
    try:
        with np.load(Path(path), allow_pickle=False) as data:
            state = json.loads(str(data[_HEADER]))
            state["arrays"] = {k: data[k] for k in data.files if k != _HEADER}
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"cannot read the OOD detector {path}: {err}") from None
    return detector_from_state(state)


__all__ = [
    "AUTO", "DETECTORS", "OODDetector", "OOD_SCORES", "OODScore", "check_temperature", "detector_class",
    "detector_from_state", "energy_score", "load_detector", "logits_array", "make_detector", "maxlogit_score",
    "msp_score", "ood_score", "save_detector",
]
