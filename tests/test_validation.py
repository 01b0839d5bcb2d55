"""Validation you can trust: a per-class floor in the split, standard errors, noise-proof best-epoch choice."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.datasets import stratified_split
from pipeline.errors import UserError
from pipeline.metrics import balanced_accuracy_se, classification_metrics
from pipeline.train import is_better_epoch


def test_split_floor_lifts_rare_classes_but_keeps_most_for_training() -> None:
    labels = np.repeat(np.arange(3), [1000, 40, 5])
    _, plain = stratified_split(labels, 0.05, seed=0)
    train, val = stratified_split(labels, 0.05, seed=0, min_per_class=20)
    counts = np.bincount(labels[val], minlength=3)
    assert np.bincount(labels[plain], minlength=3).tolist() == [50, 2, 1]
    assert counts.tolist() == [50, 13, 1]  # 40 // 3 = 13 (floor capped at a third); 5 // 3 = 1
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    with pytest.raises(UserError, match="val_min_per_class"):
        stratified_split(labels, 0.05, seed=0, min_per_class=-1)


def test_balanced_accuracy_se_matches_binomial_formula() -> None:
    y_true = np.array([0] * 10 + [1] * 40)
    y_pred = np.array([0] * 8 + [1] * 2 + [1] * 30 + [0] * 10)
    metrics = classification_metrics(y_true, y_pred, 2)
    expected = np.sqrt(0.8 * 0.2 / 10 + 0.75 * 0.25 / 40) / 2
    assert metrics["balanced_accuracy"] == pytest.approx((0.8 + 0.75) / 2)
    assert metrics["balanced_accuracy_se"] == pytest.approx(expected)
    assert balanced_accuracy_se(np.array([1.0, 1.0]), np.array([5, 5])) == 0.0


def test_best_epoch_tie_goes_to_lower_validation_nll() -> None:
    best = {"balanced_accuracy": 0.9, "loss": 0.30}
    assert is_better_epoch({"balanced_accuracy": 0.9, "loss": 0.20}, best)
    assert not is_better_epoch({"balanced_accuracy": 0.9, "loss": 0.40}, best)
    assert is_better_epoch({"balanced_accuracy": 0.91, "loss": 0.90}, best)
    assert not is_better_epoch({"balanced_accuracy": 0.89, "loss": 0.01}, best)


def test_val_fold_gives_k_fold_cross_validation() -> None:
    labels = np.repeat(np.arange(3), [100, 40, 25])
    folds = [stratified_split(labels, 0.2, seed=3, fold=f) for f in range(5)]
    assert np.array_equal(folds[0][1], stratified_split(labels, 0.2, seed=3)[1])  # fold 0 is the default split
    vals = [val for _, val in folds]
    assert all(len(v) == 33 for v in vals)  # 20 + 8 + 5 per fold
    assert len(np.unique(np.concatenate(vals))) == len(labels)  # every chip validated once: disjoint, covering
    for train, val in folds:
        assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == len(labels)
    assert not np.array_equal(stratified_split(labels, 0.2, seed=4, fold=1)[1], vals[1])  # the seed draws the folds
    with pytest.raises(UserError, match="val_fold 5"):
        stratified_split(labels, 0.2, seed=3, fold=5)  # 5 blocks of 20 fill the 100 chips: no sixth
    with pytest.raises(UserError, match="val_fold must be"):
        stratified_split(labels, 0.2, seed=3, fold=-1)


def test_stage_data_split_follows_the_configured_fold() -> None:
    """Every stage takes its split from StageData.split: data.val_fold must reach it."""
    import types

    import pandas as pd
    import torch

    from pipeline.config import load_config
    from pipeline.data.module import StageData

    packed = types.SimpleNamespace(train_index=pd.DataFrame({"class_id": np.repeat(np.arange(3), [60, 30, 30])}))
    splits = []
    for fold in (0, 1):
        cfg = load_config("quick", ["data.val_fraction=0.25", "data.val_min_per_class=0", f"data.val_fold={fold}"])
        data = StageData(packed, cfg, {}, torch.device("cpu"))  # type: ignore[arg-type]
        splits.append(data.split())
        assert np.array_equal(data.split()[1], stratified_split(packed.train_index["class_id"].to_numpy(), 0.25, cfg.seed, 0, fold)[1])
    assert len(np.intersect1d(splits[0][1], splits[1][1])) == 0
