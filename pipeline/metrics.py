"""Classification, OOD and competition metrics (numpy in, floats out)."""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts[i, j] = number of samples of true class i predicted as j."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def per_class_recall(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Recall of each class; NaN for a class with no true samples."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> dict:
    """Accuracy, balanced accuracy (mean recall over classes present), macro-F1, per-class recall."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.size == 0:
        raise ValueError("no samples to score")
    cm = confusion_matrix(y_true, y_pred, num_classes)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm).astype(np.float64)
    present = support > 0
    recall = np.where(present, tp / np.maximum(support, 1), np.nan)
    precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
    f1 = np.where(
        (precision + np.nan_to_num(recall)) > 0,
        2 * precision * np.nan_to_num(recall) / np.maximum(precision + np.nan_to_num(recall), 1e-12),
        0.0,
    )
    return {
        "accuracy": float(tp.sum() / y_true.size),
        "balanced_accuracy": float(np.nanmean(recall[present])),
        "balanced_accuracy_se": balanced_accuracy_se(recall[present], support[present]),
        "macro_f1": float(f1[present].mean()),
        "per_class_recall": [None if np.isnan(r) else float(r) for r in recall],
    }


def balanced_accuracy_se(recall: np.ndarray, support: np.ndarray) -> float:
    """Standard error of the balanced accuracy: sqrt(sum_c r_c (1 - r_c) / n_c) / C (binomial per class)."""
    recall, support = np.asarray(recall, dtype=np.float64), np.asarray(support, dtype=np.float64)
    if recall.size == 0:
        return float("nan")
    return float(np.sqrt(np.sum(recall * (1 - recall) / np.maximum(support, 1))) / recall.size)


def paired_balanced_accuracy_gain(labels: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> tuple[float, float]:
    """(balanced accuracy of `pred_b` minus that of `pred_a` on the same chips, its paired standard error):
    per class the mean of the per-chip differences in correctness, whose variance / n_c adds up as in
    `balanced_accuracy_se`; much smaller than the unpaired s.e. when the two mostly agree."""
    labels = np.asarray(labels, dtype=np.int64)
    diff = (np.asarray(pred_b) == labels).astype(np.float64) - (np.asarray(pred_a) == labels).astype(np.float64)
    classes = np.unique(labels)
    if classes.size == 0:
        return float("nan"), float("nan")
    per_class = [diff[labels == c] for c in classes]
    gain = float(np.mean([d.mean() for d in per_class]))
    se = float(np.sqrt(sum(d.var() / d.size for d in per_class)) / classes.size)
    return gain, se


def auroc(is_in_distribution: np.ndarray, score: np.ndarray) -> float:
    """AUROC of `score` with in-distribution as the positive class; NaN if only one kind is present."""
    labels = np.asarray(is_in_distribution, dtype=bool)
    if labels.all() or not labels.any():
        return float("nan")
    from sklearn.metrics import roc_auc_score  # here, not at import: sklearn adds seconds to every stage's start

    return float(roc_auc_score(labels, np.asarray(score, dtype=np.float64)))


def competition_score(accuracy: float, auroc_value: float) -> float:
    """The challenge metric: 0.75 x top-1 accuracy (in-distribution) + 0.25 x AUROC."""
    return 0.75 * accuracy + 0.25 * auroc_value
