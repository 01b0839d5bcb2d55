"""Pseudo-labels (transductive): confident, in-distribution-looking test chips join the head's training.

The stage-2 model (frozen backbone, its own head) predicts the test chips; a chip is taken with its
predicted label when its confidence (max probability) is at least `min_confidence` and its energy
score (logsumexp of the logits; higher = more in-distribution) is at least the `ood_quantile`
quantile of the validation chips' energies. Both thresholds come from the validation split:
`min_confidence: auto` is the lowest confidence above which the validation predictions are right at
least `target_precision` of the time. At most `max_per_class` chips per predicted class, most
confident first. Read from `finetune_head.pseudo_labels` in one place, `PseudoLabelSettings.from_config`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.errors import UserError


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


@dataclass(frozen=True)
class PseudoLabelSettings:
    """`finetune_head.pseudo_labels`."""

    enabled: bool
    min_confidence: float | str  # a probability, or auto (from target_precision on validation)
    target_precision: float
    ood_quantile: float  # energy floor: this quantile of validation energies; 0 = no floor
    max_per_class: int | None

    @classmethod
    def from_config(cls, section: dict | None) -> "PseudoLabelSettings":
        section = section or {}
        settings = cls(
            enabled=bool(section.get("enabled", False)),
            min_confidence=section.get("min_confidence", "auto"),
            target_precision=section.get("target_precision", 0.9),
            ood_quantile=section.get("ood_quantile", 0.1),
            max_per_class=section.get("max_per_class"),
        )
        key = "finetune_head.pseudo_labels"
        if not (settings.min_confidence == "auto" or (_is_number(settings.min_confidence) and 0.0 <= settings.min_confidence <= 1.0)):
            raise UserError(f"{key}.min_confidence={settings.min_confidence!r} is invalid: a probability in [0, 1] or auto")
        if not _is_number(settings.target_precision) or not 0.0 < settings.target_precision <= 1.0:
            raise UserError(f"{key}.target_precision={settings.target_precision!r} is invalid: a share in (0, 1]")
        if not _is_number(settings.ood_quantile) or not 0.0 <= settings.ood_quantile < 1.0:
            raise UserError(f"{key}.ood_quantile={settings.ood_quantile!r} is invalid: a quantile in [0, 1), 0 = no floor")
        if settings.max_per_class is not None and (not isinstance(settings.max_per_class, int) or isinstance(settings.max_per_class, bool) or settings.max_per_class < 1):
            raise UserError(f"{key}.max_per_class={settings.max_per_class!r} is invalid: an integer >= 1 or null")
        return settings


@dataclass
class PseudoLabels:
    """The chosen test chips (positions), their labels, and the thresholds that chose them."""

    indices: np.ndarray  # int64 positions among the test chips
    labels: np.ndarray  # int64 predicted labels
    min_confidence: float
    energy_floor: float | None
    val_precision: float  # accuracy of validation chips that pass both thresholds (NaN: none pass)
    reason: str


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def energy(logits: np.ndarray) -> np.ndarray:
    """logsumexp of the logits (the negative energy at T = 1): higher = more in-distribution."""
    m = logits.max(axis=1)
    return m + np.log(np.exp(logits - m[:, None]).sum(axis=1))


def confidence_for_precision(confidence: np.ndarray, correct: np.ndarray, target: float) -> float | None:
    """The lowest threshold t (a validation confidence) such that chips with confidence >= t are right at
    least `target` of the time; None when no threshold reaches it."""
    order = np.argsort(-confidence, kind="stable")
    hits = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    ok = np.nonzero(hits >= target - 1e-12)[0]
    if ok.size == 0:
        return None
    return float(confidence[order][ok.max()])


def select_pseudo_labels(
    test_logits: np.ndarray, val_logits: np.ndarray, val_labels: np.ndarray, settings: PseudoLabelSettings
) -> PseudoLabels:
    """Test chips to pseudo-label, with thresholds set on the validation split (module doc)."""
    test_logits = np.asarray(test_logits, dtype=np.float64)
    val_logits = np.asarray(val_logits, dtype=np.float64)
    val_labels = np.asarray(val_labels, dtype=np.int64)
    val_probs = _softmax(val_logits)
    val_conf, val_pred = val_probs.max(axis=1), val_probs.argmax(axis=1)
    floor = None
    val_in = np.ones(len(val_labels), dtype=bool)
    if settings.ood_quantile > 0 and len(val_labels):
        val_energy = energy(val_logits)
        floor = float(np.quantile(val_energy, settings.ood_quantile))
        val_in = val_energy >= floor
    empty = np.zeros(0, dtype=np.int64)
    if settings.min_confidence == "auto":
        threshold = confidence_for_precision(val_conf[val_in], val_pred[val_in] == val_labels[val_in],
                                             float(settings.target_precision))
        if threshold is None:
            return PseudoLabels(empty, empty, float("nan"), floor, float("nan"),
                                f"no validation confidence reaches precision {settings.target_precision}")
    else:
        threshold = float(settings.min_confidence)
    passed = val_in & (val_conf >= threshold)
    precision = float((val_pred[passed] == val_labels[passed]).mean()) if passed.any() else float("nan")

    probs = _softmax(test_logits)
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    take = conf >= threshold
    if floor is not None:
        take &= energy(test_logits) >= floor
    chosen = np.nonzero(take)[0]
    if settings.max_per_class is not None:
        kept = []
        for c in np.unique(pred[chosen]):
            mine = chosen[pred[chosen] == c]
            kept.append(mine[np.argsort(-conf[mine], kind="stable")][: settings.max_per_class])
        chosen = np.sort(np.concatenate(kept)) if kept else empty
    return PseudoLabels(chosen.astype(np.int64), pred[chosen].astype(np.int64), threshold, floor, precision,
                        f"{len(chosen)} test chips")


def pseudo_labelled_embeddings(
    model: torch.nn.Module, test: Any, val_emb: torch.Tensor, val_labels: torch.Tensor,
    settings: PseudoLabelSettings, device: torch.device, num_classes: int,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Embeddings and predicted labels of the `test` chips the stage-2 model is sure of, and a record of
    the choice (thresholds set on the validation embeddings `val_emb`, `val_labels`)."""
    from pipeline.tasks import embed_dataset

    test_emb, _ = embed_dataset(model, test, 512, device)
    with torch.no_grad():
        head = copy.deepcopy(model.classifier).to("cpu").float()
        test_logits, val_logits = head(test_emb).numpy(), head(val_emb).numpy()
    chosen = select_pseudo_labels(test_logits, val_logits, val_labels.numpy(), settings)
    info = {"chips": int(len(chosen.indices)), "of": int(len(test_emb)), "min_confidence": chosen.min_confidence,
            "energy_floor": chosen.energy_floor, "val_precision": chosen.val_precision,
            "per_class": np.bincount(chosen.labels, minlength=num_classes).tolist(), "reason": chosen.reason}
    return test_emb[torch.as_tensor(chosen.indices)], torch.as_tensor(chosen.labels), info
