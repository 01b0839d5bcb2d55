"""Voting chosen on validation (tau quantile, OOD floor, k by simulation, no gain -> no vote) and pseudo-labels."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.cluster import (
    VotingSettings, choose_cluster_size, cluster_vote, k_for_size, plan_voting, resolve_tau, simulate_voting,
)
from pipeline.errors import UserError
from pipeline.pseudo import PseudoLabelSettings, confidence_for_precision, energy, select_pseudo_labels

BASE = {"enabled": True, "k": "validation", "tau": "auto", "tau_quantile": 0.5, "rho": 0.6, "min_voters": 2,
        "min_voter_share": 0.2, "top_k": 2, "niter": 10, "ood_quantile": 0.0, "cluster_sizes": [5, 20],
        "require_gain": True}


def _blobs(n_per: int, classes: int, seed: int, noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.eye(classes, 8)
    labels = np.repeat(np.arange(classes), n_per)
    return (centres[labels] + noise * rng.standard_normal((len(labels), 8))).astype(np.float32), labels


def _probs(labels: np.ndarray, classes: int, wrong: np.ndarray, confident: np.ndarray) -> np.ndarray:
    """Probabilities: the true class (or, where `wrong`, the next class) gets 0.9 if confident else 0.4."""
    pred = np.where(wrong, (labels + 1) % classes, labels)
    probs = np.full((len(labels), classes), 0.0)
    top = np.where(confident, 0.9, 0.4)
    probs[:] = ((1 - top) / (classes - 1))[:, None]
    probs[np.arange(len(labels)), pred] = top
    second = np.where(wrong, labels, (labels + 1) % classes)  # the truth stays in the top 2
    probs[np.arange(len(labels)), second] += 1e-3
    return probs / probs.sum(axis=1, keepdims=True)


def test_tau_auto_is_the_validation_quantile() -> None:
    settings = VotingSettings.from_config({**BASE, "tau_quantile": 0.75})
    conf = np.linspace(0.1, 0.9, 101)
    assert resolve_tau(settings, conf) == pytest.approx(np.quantile(conf, 0.75))
    assert resolve_tau(VotingSettings.from_config({**BASE, "tau": 0.8}), conf) == 0.8
    with pytest.raises(UserError, match="tau_quantile"):
        VotingSettings.from_config({**BASE, "tau_quantile": 1.5})
    with pytest.raises(UserError, match="infer.cluster.k"):
        VotingSettings.from_config({**BASE, "k": "sometimes"})
    with pytest.raises(UserError, match="infer.cluster.tau="):
        VotingSettings.from_config({**BASE, "tau": "often"})


def test_ineligible_chips_are_neither_clustered_nor_relabelled() -> None:
    emb, labels = _blobs(10, 3, seed=0)
    wrong = np.zeros(len(labels), bool)
    wrong[[0, 10, 20]] = True  # one unsure wrong chip per cluster
    probs = _probs(labels, 3, wrong, confident=~wrong)
    everyone = cluster_vote(emb, probs, 3, 0.8, 0.6, niter=10, min_voters=2)
    assert everyone.changed[[0, 10, 20]].all()  # voting fixes them
    eligible = np.ones(len(labels), bool)
    eligible[[0, 10]] = False
    some = cluster_vote(emb, probs, 3, 0.8, 0.6, niter=10, min_voters=2, eligible=eligible)
    assert not some.changed[[0, 10]].any() and some.changed[20]
    assert (some.cluster[[0, 10]] == -1).all() and (some.cluster[eligible] >= 0).all()


def test_simulated_voting_chooses_k_and_refuses_to_vote_when_it_hurts() -> None:
    settings = VotingSettings.from_config(BASE)
    emb, labels = _blobs(20, 4, seed=1)
    wrong = np.zeros(len(labels), bool)
    wrong[::10] = True
    good = _probs(labels, 4, wrong, confident=~wrong)
    table = simulate_voting(emb, good, labels, settings, tau=0.8, sizes=(5, 20))
    assert list(table["cluster_size"]) == [5, 20] and list(table["k"]) == [16, 4]
    assert (table["gain"] > 0).any()
    assert table["balanced_after"].max() == pytest.approx(1.0)
    assert choose_cluster_size(table) in (5, 20)
    plan = plan_voting(settings, np.ones(100), 4, 0, emb, good, labels, np.ones(len(labels)))
    assert plan.vote and plan.k == k_for_size(100, choose_cluster_size(plan.validation), 4)
    assert plan.tau == pytest.approx(np.quantile(good.max(axis=1), 0.5))
    # confident wrong voters: voting spreads their mistake, simulation sees it, no vote
    bad_wrong = np.zeros(len(labels), bool)
    bad_wrong[: len(labels) // 2 : 2] = True
    bad = _probs(labels, 4, bad_wrong, confident=bad_wrong)
    bad_plan = plan_voting(settings, np.ones(100), 4, 0, emb, bad, labels, np.ones(len(labels)))
    assert not bad_plan.vote and "does not help" in bad_plan.reason
    off = plan_voting(VotingSettings.from_config({**BASE, "enabled": False}), np.ones(5), 4, 0)
    assert not off.vote


def test_plan_ood_floor_from_validation_scores() -> None:
    settings = VotingSettings.from_config({**BASE, "k": 2, "require_gain": False, "tau": 0.5, "ood_quantile": 0.2})
    val_scores = np.arange(100, dtype=float)
    test_scores = np.array([0.0, 10.0, 19.0, 20.0, 50.0, 99.0])
    plan = plan_voting(settings, test_scores, 2, 0, val_scores=val_scores)
    assert plan.floor == pytest.approx(np.quantile(val_scores, 0.2))
    assert list(plan.eligible) == [False, False, False, True, True, True]


def test_confidence_for_precision() -> None:
    conf = np.array([0.95, 0.9, 0.8, 0.7, 0.6])
    correct = np.array([1, 1, 0, 1, 0], dtype=bool)
    assert confidence_for_precision(conf, correct, 1.0) == 0.9
    assert confidence_for_precision(conf, correct, 0.75) == 0.7  # 3 of the top 4
    assert confidence_for_precision(conf, ~correct, 0.9) is None


def test_pseudo_label_selection_uses_validation_thresholds() -> None:
    rng = np.random.default_rng(0)
    classes = 3
    val_labels = np.repeat(np.arange(classes), 30)
    val_logits = rng.normal(0, 0.3, (90, classes))
    margin = np.linspace(0.0, 4.0, 90)
    val_logits[np.arange(90), val_labels] += margin  # the more confident, the more often right
    val_logits[:10, 1] += 2.0 * (val_labels[:10] != 1)  # some fairly confident mistakes
    settings = PseudoLabelSettings.from_config({"enabled": True, "min_confidence": "auto", "target_precision": 0.95,
                                                "ood_quantile": 0.0, "max_per_class": None})
    test_logits = np.array([[6.0, 0, 0], [0.2, 0.1, 0], [0, 0, 6.0], [0, 7.0, 0]])
    chosen = select_pseudo_labels(test_logits, val_logits, val_labels, settings)
    assert chosen.val_precision >= 0.95
    assert list(chosen.indices) == [0, 2, 3] and list(chosen.labels) == [0, 2, 1]  # the unsure chip is left out
    capped = select_pseudo_labels(test_logits, val_logits, val_labels,
                                  PseudoLabelSettings.from_config({"enabled": True, "min_confidence": 0.5, "max_per_class": 1}))
    assert list(capped.indices) == [0, 2, 3]
    # an energy floor from validation removes a confident chip with small logits (out-of-distribution looking)
    floor_settings = PseudoLabelSettings.from_config({"enabled": True, "min_confidence": 0.5, "ood_quantile": 0.5})
    faint = np.array([[6.0, 0, 0], [0.9, -0.9, -0.9]])
    floored = select_pseudo_labels(faint, val_logits, val_labels, floor_settings)
    assert floored.energy_floor == pytest.approx(np.quantile(energy(val_logits), 0.5))
    assert list(floored.indices) == [0]
    with pytest.raises(UserError, match="min_confidence"):
        PseudoLabelSettings.from_config({"min_confidence": 2})


def test_stages_with_pseudo_labels_and_planned_voting(tmp_path):
    """finetune_head takes pseudo-labelled test chips (recorded, test chips a parent); infer plans voting on validation."""
    import json

    from pipeline.data.synth import generate
    from stages import distill_sar, finetune_head, infer, pretrain_eo

    generate(tmp_path / "data", "tiny", seed=7)
    common = ["--data", str(tmp_path / "data"), "--profile", "tiny", "--weights", str(tmp_path / "w"),
              "--cache-dir", str(tmp_path / "cache")]
    assert pretrain_eo.main(common) == 0 and distill_sar.main(common) == 0
    pseudo = ["--set", "finetune_head.pseudo_labels.enabled=true", "--set", "finetune_head.pseudo_labels.min_confidence=0.0",
              "--set", "finetune_head.pseudo_labels.ood_quantile=0.0"]
    assert finetune_head.main([*common, *pseudo]) == 0
    final = json.loads((tmp_path / "w" / "sar_final.json").read_text())
    assert final["pseudo_labels"]["chips"] == 33  # every tiny test chip (30 known + 3 unseen) passes a zero threshold
    assert "test_chips" in final["parents"] and final["config"]["finetune_head"]["pseudo_labels"]["enabled"] is True
    assert infer.main([*common, "--submissions", str(tmp_path / "subs"), "--run", "r",
                       "--set", "infer.cluster.require_gain=false"]) == 0
    voting = json.loads((tmp_path / "subs" / "r" / "summary.json").read_text())["voting"]
    assert voting["applied"] is True and voting["validation"] and 0.0 <= voting["tau"] <= 1.0
    assert voting["ood_floor"] is not None and voting["eligible"] <= 33
    with pytest.raises(SystemExit):  # pseudo-labels need the fast path
        finetune_head.main([*common, *pseudo, "--set", "finetune_head.augment=true"])
