"""Inference: the TTA forward over a dataset, cluster voting, the OOD score and the submission tables.

`predict` is used by the infer stage on the test chips and by OOD fitting/selection on the training
split, so that both see exactly the same TTA averaging; `run_inference` is the infer stage's whole
computation (forward, voting, detector fit and score) and `prediction_tables` its two output tables.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from pipeline import distributed
from pipeline.cluster import VotingPlan, VotingResult, VotingSettings, cluster_vote, no_vote, plan_voting
from pipeline.config import InferConfig
from pipeline.ood import OODDetector, ood_score
from pipeline.ood.anomalies import KINDS, AnomalyDataset, anomaly_count
from pipeline.ood.fit import head_of
from pipeline.tta import predict_tta


@torch.no_grad()
def predict(
    model: torch.nn.Module, dataset: Any, cfg: InferConfig, device: torch.device
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TTA class scores, raw logits and embeddings of every chip of `dataset`, streamed in batches
    (sharded across ranks, gathered), in dataset order. `cfg` is the infer section (batch_size, tta).
    Class scores decide labels (mean logits or log mean probabilities, as `infer.tta.average` says);
    the mean raw logits are what logit OOD scores are computed from."""
    sampler = distributed.ShardSampler(len(dataset)) if distributed.is_distributed() else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, shuffle=False)
    tta = cfg.tta
    scores, logits, embs, index = [], [], [], []
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = predict_tta(model, x, tta.views, tta.scales, tta.average)
        scores.append(out.class_scores.float().cpu())
        logits.append(out.logits.float().cpu())
        embs.append(out.embeddings.float().cpu())
        index.append(torch.as_tensor(batch["index"]))
    scores_np = torch.cat(scores).numpy().astype(np.float64)
    logits_np = torch.cat(logits).numpy().astype(np.float64)
    embs_np = torch.cat(embs).numpy().astype(np.float32)
    index_np = torch.cat(index).numpy().astype(np.int64)
    if distributed.is_distributed():
        scores_np, logits_np, embs_np, index_np = distributed.all_gather_arrays(scores_np, logits_np, embs_np, index_np)
    order = np.argsort(index_np, kind="stable")
    return scores_np[order], logits_np[order], embs_np[order]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def anomaly_dataset(detector: OODDetector, dataset: Any, labels: np.ndarray, seed: int = 0) -> AnomalyDataset:
    """The virtual anomalies `detector` is fitted against, made from the chips of `dataset` (its
    `anomalies_per_chip` and `anomaly_kinds`, seeded)."""
    count = anomaly_count(len(labels), getattr(detector, "anomalies_per_chip", 1.0))
    return AnomalyDataset(dataset, np.asarray(labels), count, seed=seed, kinds=getattr(detector, "anomaly_kinds", KINDS))


def fit_on_split(
    detector: OODDetector, model: torch.nn.Module, dataset: Any, labels: np.ndarray, infer_cfg: InferConfig,
    device: torch.device, seed: int = 0,
) -> OODDetector:
    """Fit `detector` on the TTA-averaged logits/embeddings of `dataset` (the training split) under the
    infer section's `tta` and `batch_size`; a detector that needs no fitting returns untouched. One
    that `needs_anomalies` also gets the embeddings of virtual anomalies of the same chips (same TTA)."""
    if not detector.needs_fit:
        return detector
    _, logits, embeddings = predict(model, dataset, infer_cfg, device)
    anomalies = None
    if detector.needs_anomalies:
        _, _, anomalies = predict(model, anomaly_dataset(detector, dataset, labels, seed), infer_cfg, device)
    return detector.fit(logits, embeddings, np.asarray(labels, dtype=np.int64), head=head_of(model), anomalies=anomalies)


@dataclass
class InferenceResult:
    """Everything the infer stage computed for the test chips (rows in test-index order)."""

    logits: np.ndarray  # TTA-averaged raw logits (N, C): what logit OOD scores read
    probs: np.ndarray  # class probabilities from the TTA class scores (N, C)
    embeddings: np.ndarray  # TTA-averaged embeddings (N, D)
    voting: VotingResult  # labels after cluster voting (or untouched when voting is off)
    plan: VotingPlan  # what voting was planned on validation, and why
    score: np.ndarray  # the detector's OOD score, higher = more in-distribution
    energy: np.ndarray  # the energy score, kept beside any detector for comparison
    fitted_on: int  # training chips the detector was fitted on (0: needs no fitting)
    predict_seconds: float
    fit_seconds: float


def voting_settings(cfg: InferConfig) -> VotingSettings:
    """The cluster-voting settings (joint rules checked here: call it before predicting anything)."""
    return VotingSettings.from_config(cfg.cluster.model_dump())


def run_inference(
    model: torch.nn.Module,
    test: Any,
    cfg: InferConfig,
    detector: OODDetector,
    device: torch.device,
    seed: int = 0,
    fit_data: Callable[[], tuple[Any, np.ndarray]] | None = None,
    val_data: Callable[[], tuple[Any, np.ndarray]] | None = None,
) -> InferenceResult:
    """TTA forward over `test`; the OOD score of `detector`, fitted first (when it needs it) on
    `fit_data()` = (training dataset, its labels) with the same TTA (and, for a detector that needs them,
    on virtual anomalies of those chips seeded with `seed`); then cluster voting as planned on
    `val_data()` = (validation dataset, its labels): tau, the OOD floor and k, and whether to vote at all."""
    settings = voting_settings(cfg)
    start = time.perf_counter()
    class_scores, logits, embeddings = predict(model, test, cfg, device)
    predict_seconds = time.perf_counter() - start
    probs = softmax(class_scores)  # the TTA-averaged probabilities when infer.tta.average is probs
    fit_start, fitted_on = time.perf_counter(), 0
    if detector.needs_fit:
        if fit_data is None:
            raise ValueError(f"the {detector.name} detector needs training data to fit on")
        dataset, labels = fit_data()
        fit_on_split(detector, model, dataset, labels, cfg, device, seed=seed)
        fitted_on = len(labels)
    fit_seconds = time.perf_counter() - fit_start
    score = detector.score(logits=logits, embeddings=embeddings)

    validation: dict[str, np.ndarray] = {}
    if settings.enabled and settings.needs_validation and val_data is not None:
        dataset, labels = val_data()
        v_scores, v_logits, v_emb = predict(model, dataset, cfg, device)
        validation = {"val_embeddings": v_emb, "val_probs": softmax(v_scores), "val_labels": np.asarray(labels),
                      "val_scores": detector.score(logits=v_logits, embeddings=v_emb)}
    num_classes = probs.shape[1]
    plan = plan_voting(settings, score, num_classes, seed, **validation)
    voting = (
        cluster_vote(embeddings, probs, plan.k, plan.tau, settings.rho, niter=settings.niter, seed=seed,
                     min_voters=settings.min_voters, min_voter_share=settings.min_voter_share, top_k=settings.top_k,
                     eligible=plan.eligible)
        if plan.vote else no_vote(probs)
    )
    return InferenceResult(
        logits=logits, probs=probs, embeddings=embeddings, voting=voting, plan=plan, score=score,
        energy=ood_score(logits, "energy", cfg.ood.temperature),
        fitted_on=fitted_on, predict_seconds=predict_seconds, fit_seconds=fit_seconds,
    )


def voting_record(out: InferenceResult) -> dict[str, Any]:
    """What voting did, for summary.json."""
    plan = out.plan
    return {"applied": bool(plan.vote), "reason": plan.reason, "tau": plan.tau if math.isfinite(plan.tau) else None,
            "k": int(out.voting.k), "ood_floor": plan.floor, "eligible": int(plan.eligible.sum()),
            "validation": None if plan.validation is None else plan.validation.to_dict(orient="records")}


def prediction_tables(ids: np.ndarray, paths: np.ndarray, out: InferenceResult) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(results: image_id, class_id, score — the submission; predictions: every per-chip detail)."""
    voting, probs, logits = out.voting, out.probs, out.logits
    results = pd.DataFrame({"image_id": ids, "class_id": voting.labels.astype(np.int64), "score": out.score})
    predictions = pd.DataFrame({
        "image_id": ids, "path": paths,
        "label_before": probs.argmax(axis=1), "label_after": voting.labels, "changed": voting.changed,
        "cluster": voting.cluster, "confidence": probs.max(axis=1), "score": out.score, "energy": out.energy,
        **{f"logit_{c}": logits[:, c] for c in range(logits.shape[1])},
        **{f"prob_{c}": probs[:, c] for c in range(probs.shape[1])},
    })
    return results, predictions
