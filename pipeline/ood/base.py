"""The interface every OOD detector implements, and the input checks they share.

A detector is fitted once on the training split's outputs of the final model and then scores any
number of chips. Imports nothing from the detector modules, so they can all import it (no cycles).
"""

from __future__ import annotations

import abc
import json
import math
from typing import Any, ClassVar

import numpy as np

from pipeline.config import OODConfig
from pipeline.errors import UserError

STATE_FORMAT = 1  # bumped when the saved layout of a detector's state changes


def as_float_array(values: Any, what: str) -> np.ndarray:
    """A 2-D float64 numpy array (N, K) from a numpy array or a (any device, any dtype) torch tensor."""
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().to("cpu").double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] == 0:
        raise ValueError(f"{what} must be (N, K) with K >= 1, got shape {array.shape}")
    return array


def as_vector(values: Any, what: str) -> np.ndarray:
    """A 1-D float64 numpy array from a numpy array or a torch tensor."""
    if hasattr(values, "detach"):
        values = values.detach().to("cpu").double().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {array.shape}")
    return array


def logits_array(logits: Any) -> np.ndarray:
    """Logits (N, C) from a numpy array or a (any device, any dtype) torch tensor, as float64 numpy."""
    return as_float_array(logits, "logits")


def check_temperature(temperature: float) -> float:
    """The temperature as a float; UserError unless it is a positive finite number."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.number)) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise UserError(f"infer.ood.temperature={temperature!r} is invalid: a positive number such as 1.0")
    return float(temperature)


def check_positive_int(value: Any, key: str, allow_none: bool = False) -> int | None:
    """`value` as an int >= 1 (or None when allowed); UserError naming the config key otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        extra = " or null" if allow_none else ""
        raise UserError(f"{key}={value!r} is invalid: a whole number >= 1{extra}")
    return int(value)


class OODDetector(abc.ABC):
    """An out-of-distribution detector: `fit` on training-split outputs, then `score` any chips.

    SIGN CONVENTION (the one place it is stated): `score` returns float64 (N,) where a HIGHER score
    means MORE IN-DISTRIBUTION, which is the competition's `score` column as is.

    - `fit(logits, embeddings, labels, head=None) -> self`: logits (N, C), embeddings (N, D) and integer
      labels (N,) of the training split, TTA-averaged exactly like the chips that will be scored;
      `head` = (weight (C, D), bias (C,)) of the model's linear classifier, needed by detectors that
      map embeddings to logits themselves (ViM). Detectors that need no fitting return at once.
    - `score(logits=None, embeddings=None) -> np.ndarray`: each detector reads what it `uses`.
    - `state()` / `from_state(state)`: the constructor parameters (JSON) and fitted arrays (numpy), so
      a fitted detector is saved without pickle (`pipeline.ood.save_detector` writes one .npz).
    """

    name: ClassVar[str] = ""
    uses: ClassVar[str] = "logits"  # "logits" | "embeddings": the input `score` needs
    needs_fit: ClassVar[bool] = False
    needs_anomalies: ClassVar[bool] = False  # fit also needs embeddings of virtual anomalies (anomalies=)
    _array_names: ClassVar[tuple[str, ...]] = ()  # the fitted arrays, saved by `state`

    def __init__(self) -> None:
        self.fitted = not self.needs_fit

    # --- parameters and configuration ------------------------------------------------------------

    def params(self) -> dict[str, Any]:
        """Constructor parameters (JSON values): `type(self)(**self.params())` is the unfitted twin."""
        return {}

    @classmethod
    def from_config(cls, ood_cfg: OODConfig, seed: int = 0, **overrides: Any) -> "OODDetector":
        """The detector from the `infer.ood` config section; `overrides` replace parameters by name."""
        return cls(**overrides)

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params().items() if k != "seed")
        return f"{self.name}({args})" if args else self.name

    # --- fitting and scoring ----------------------------------------------------------------------

    def fit(
        self, logits: Any, embeddings: Any, labels: Any, head: tuple[Any, Any] | None = None, anomalies: Any = None
    ) -> "OODDetector":
        """`anomalies`: embeddings (M, D) of virtual anomalies of the same chips (pipeline.ood.anomalies),
        embedded with the same TTA; read only by detectors that set `needs_anomalies`."""
        if self.needs_fit:
            if self.needs_anomalies:
                self._fit(logits, embeddings, labels, head, anomalies=anomalies)
            else:
                self._fit(logits, embeddings, labels, head)
            self.fitted = True
        return self

    def _fit(self, logits: Any, embeddings: Any, labels: Any, head: tuple[Any, Any] | None) -> None:
        """Detectors with `needs_fit` override this; the others are never fitted."""
        raise TypeError(f"{type(self).__name__} sets needs_fit but has no _fit")

    def score(self, logits: Any = None, embeddings: Any = None) -> np.ndarray:
        if not self.fitted:
            raise RuntimeError(f"the {self.name} detector must be fitted before it scores")
        data = logits if self.uses == "logits" else embeddings
        if data is None:
            raise ValueError(f"the {self.name} detector scores {self.uses}: pass {self.uses}=")
        return np.asarray(self._score(as_float_array(data, self.uses)), dtype=np.float64)

    @abc.abstractmethod
    def _score(self, data: np.ndarray) -> np.ndarray:
        """Scores (N,) of logits or embeddings (as `uses` says); higher = more in-distribution."""

    # --- saving -----------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """{"name", "format", "params" (JSON), "arrays" (name -> numpy array)} of the fitted detector."""
        if not self.fitted:
            raise RuntimeError(f"the {self.name} detector is not fitted: nothing to save")
        return {
            "name": self.name, "format": STATE_FORMAT, "params": self.params(),
            "arrays": {k: np.asarray(getattr(self, k)) for k in self._array_names},
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "OODDetector":
        """The fitted detector back from `state()` (the same scores, bit for bit)."""
        if state.get("name") != cls.name or state.get("format") != STATE_FORMAT:
            raise UserError(
                f"saved OOD detector is {state.get('name')!r} format {state.get('format')!r}: "
                f"expected {cls.name!r} format {STATE_FORMAT}"
            )
        detector = cls(**state["params"])
        arrays = state.get("arrays", {})
        missing = [k for k in cls._array_names if k not in arrays]
        if missing:
            raise UserError(f"saved {cls.name} detector lacks {', '.join(missing)}")
        for k in cls._array_names:
            setattr(detector, k, np.asarray(arrays[k]))
        detector._loaded()
        detector.fitted = True
        return detector

    def _loaded(self) -> None:
        """Rebuild anything derived from the arrays after `from_state` (e.g. a search index)."""


class TemperatureDetector(OODDetector):
    """A logit score with one setting, the temperature `infer.ood.temperature` (energy, MSP); no fitting."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)

    def params(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    @classmethod
    def from_config(cls, ood_cfg: OODConfig, seed: int = 0, **overrides: Any) -> "TemperatureDetector":
        return cls(**{"temperature": ood_cfg.temperature, **overrides})


def labels_array(labels: Any, n: int) -> np.ndarray:
    """Integer labels (n,) as int64 numpy."""
    if hasattr(labels, "detach"):
        labels = labels.detach().to("cpu").numpy()
    array = np.asarray(labels)
    if array.shape != (n,) or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be integers of shape ({n},), got {array.dtype} {array.shape}")
    return array.astype(np.int64)


def state_json(state: dict[str, Any]) -> str:
    """The non-array part of a state as JSON text."""
    return json.dumps({k: v for k, v in state.items() if k != "arrays"}, sort_keys=True)
