"""Benchmark helpers whose figures go into the README: the bare-model rate they divide by must be the
one the stage trained at (same batch, same input)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from pipeline.bench.train import bare_rate, per_process_rate, trained_batch_size

SPEC = {"timm_name": "aconvnet_fast", "num_classes": 4, "in_chans": 1, "input_size": [40, 40], "small_input": False,
        "drop_rate": 0.0, "embed_dim": 128, "window": 32, "intensity": "standardize"}


def test_trained_batch_size_reads_the_loader_batch_from_metrics():
    history = pd.DataFrame({"epoch": [1, 2], "images_per_s": [10.0, 12.0], "batch_size": [50, 50]})
    assert trained_batch_size(history, configured=512) == (50, True)  # min_steps_per_epoch lowered 512 to 50
    assert trained_batch_size(history.drop(columns="batch_size"), configured=512) == (512, False)  # older metrics.csv
    assert trained_batch_size(history.assign(batch_size=float("nan")), configured=256) == (256, False)


def test_stage_rate_is_per_process_under_torchrun():
    history = pd.DataFrame({"epoch": [1, 2], "images_per_s": [300.0, 400.0]})
    assert per_process_rate(history) == 400.0  # an older metrics.csv: one process
    assert per_process_rate(history.assign(processes=4)) == 100.0  # 4 ranks counted together


def test_bare_rate_times_the_training_window(monkeypatch):
    """Also for a fixed-size model: it is built at the window, not at the stored chip size."""
    seen = []
    import pipeline.bench.train as bench

    original = bench.model_from_spec

    def spy(spec):
        model = original(spec)
        model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
        return model

    monkeypatch.setattr(bench, "model_from_spec", spy)
    rate = bare_rate(SPEC, batch_size=8, steps=3)
    assert math.isfinite(rate) and rate > 0
    assert seen and all(shape == (8, 1, 32, 32) for shape in seen)  # the 32-px window, not the 40-px stored chip
    vit = {**SPEC, "timm_name": "vit_tiny_patch16_224", "input_size": [48, 48]}  # asserts its input size
    assert bare_rate(vit, batch_size=2, steps=2) > 0


def test_bench_models_folds_are_paired_k_fold_runs():
    from pipeline.bench.models import fold_overrides, paired_delta, repeats
    from pipeline.config import load_config

    assert repeats(2, 0) == [(0, None), (1, None)]
    assert repeats(3, 5) == [(0, f) for f in range(5)]  # folds replace seeds
    cfg = load_config("quick", fold_overrides(3, 5))
    assert (cfg.data.val_fraction, cfg.data.val_fold, cfg.data.val_min_per_class) == (0.2, 3, 0)
    rows = [{"candidate": "a", "seed": 0, "fold": f, "val_balanced_accuracy": v} for f, v in enumerate((0.9, 0.8))]
    rows += [{"candidate": "b", "seed": 0, "fold": f, "val_balanced_accuracy": v} for f, v in enumerate((0.95, 0.82))]
    assert paired_delta(rows, "b", "a") == pytest.approx([0.05, 0.02])
