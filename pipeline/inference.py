"""Inference: the TTA forward over a dataset, cluster voting, the OOD score and the submission tables.

`predict` is used by the infer stage on the test chips and by OOD fitting/selection on the training
split, so that both see exactly the same TTA averaging, with the views `resolve_views` settles (given,
or chosen on the validation split); `run_inference` is the infer stage's whole
computation (forward, voting, detector fit and score) and `prediction_tables` its two output tables.
"""

from __future__ import annotations

import functools
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
from pipeline.tta import VIEW_NAMES, ViewChoice, choose_views, combine_class_scores, predict_tta


Prediction = tuple[np.ndarray, np.ndarray, np.ndarray]  # class scores (N, C), raw logits (N, C), embeddings (N, D)


def views_of(cfg: InferConfig) -> list[str]:
    """The infer section's TTA views; `auto` must have been resolved first (`resolve_views`)."""
    if cfg.tta.views == "auto":
        raise ValueError("infer.tta.views is auto: resolve it on the validation split first (resolve_views)")
    return list(cfg.tta.views)


@torch.no_grad()
def predict_view_sets(
    model: torch.nn.Module, dataset: Any, cfg: InferConfig, device: torch.device, view_sets: list[list[str]]
) -> list[Prediction]:
    """`predict` for several view sets in one pass over `dataset` (one forward per set and batch), at the
    infer section's scales and averaging: one Prediction per view set."""
    sampler = distributed.ShardSampler(len(dataset)) if distributed.is_distributed() else None
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, shuffle=False)
    tta = cfg.tta
    outputs: list[tuple[list, list, list]] = [([], [], []) for _ in view_sets]
    index = []
    for batch in loader:
        x = batch["image"].to(device, non_blocking=True)
        for views, (scores, logits, embs) in zip(view_sets, outputs):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = predict_tta(model, x, views, tta.scales, tta.average)
            scores.append(out.class_scores.float().cpu())
            logits.append(out.logits.float().cpu())
            embs.append(out.embeddings.float().cpu())
        index.append(torch.as_tensor(batch["index"]))
    index_np = torch.cat(index).numpy().astype(np.int64)
    results = []
    for scores, logits, embs in outputs:
        scores_np = torch.cat(scores).numpy().astype(np.float64)
        logits_np = torch.cat(logits).numpy().astype(np.float64)
        embs_np = torch.cat(embs).numpy().astype(np.float32)
        order_index = index_np
        if distributed.is_distributed():
            scores_np, logits_np, embs_np, order_index = distributed.all_gather_arrays(scores_np, logits_np, embs_np, index_np)
        order = np.argsort(order_index, kind="stable")
        results.append((scores_np[order], logits_np[order], embs_np[order]))
    return results


def predict(model: torch.nn.Module, dataset: Any, cfg: InferConfig, device: torch.device) -> Prediction:
    """TTA class scores, raw logits and embeddings of every chip of `dataset`, streamed in batches
    (sharded across ranks, gathered), in dataset order. `cfg` is the infer section (batch_size, tta;
    views resolved). Class scores decide labels (mean logits or log mean probabilities, as
    `infer.tta.average` says); the mean raw logits are what logit OOD scores are computed from."""
    return predict_view_sets(model, dataset, cfg, device, [views_of(cfg)])[0]


def combine_views(per_view: dict[str, Prediction], views: list[str], average: str) -> Prediction:
    """The Prediction of view set `views` from the Predictions of its single views (same scales): what
    `predict` gives for the set, without a second forward."""
    parts = [per_view[v] for v in views]
    return (combine_class_scores([p[0] for p in parts], average),
            np.mean([p[1] for p in parts], axis=0),
            np.mean([p[2] for p in parts], axis=0).astype(np.float32))


@dataclass
class ResolvedViews:
    """`resolve_views`: the infer section with concrete views, the choice, and (when views were chosen on
    validation) the validation split's Prediction under the chosen views, for voting to reuse."""

    cfg: InferConfig
    choice: ViewChoice
    validation: Prediction | None = None


def with_views(cfg: InferConfig, views: list[str]) -> InferConfig:
    """The infer section with `infer.tta.views` set to `views`."""
    return cfg.model_copy(update={"tta": cfg.tta.model_copy(update={"views": list(views)})})


def resolve_views(
    model: torch.nn.Module, cfg: InferConfig, device: torch.device,
    val_split: Callable[[], tuple[Any, np.ndarray]] | None,
) -> ResolvedViews:
    """The TTA views to use. Given ones are kept. `auto`: each view of `infer.tta.candidates`, of
    `infer.tta.baseline` and identity goes through one forward over `val_split()` = (validation dataset, its
    labels), and the baseline is kept unless a candidate set beats it (`choose_views`); without a validation
    split, the baseline."""
    if cfg.tta.views != "auto":
        return ResolvedViews(cfg, ViewChoice(list(cfg.tta.views), "infer.tta.views is given"))
    if val_split is None:
        choice = ViewChoice(list(cfg.tta.baseline), f"no validation split to choose on: the baseline {'+'.join(cfg.tta.baseline)}", auto=True)
        return ResolvedViews(with_views(cfg, choice.views), choice)
    dataset, labels = val_split()
    names = [v for v in VIEW_NAMES if v == "identity" or any(v in views for views in [*cfg.tta.candidates, cfg.tta.baseline])]
    per_view = dict(zip(names, predict_view_sets(model, dataset, cfg, device, [[v] for v in names])))
    choice = choose_views({v: p[0] for v, p in per_view.items()}, labels, cfg.tta.candidates, cfg.tta.average,
                          cfg.tta.min_gain_se, cfg.tta.baseline)
    return ResolvedViews(with_views(cfg, choice.views), choice, combine_views(per_view, choice.views, cfg.tta.average))


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
    tta: ViewChoice  # the TTA views used (chosen on validation when infer.tta.views is auto)
    views: int  # forward passes per chip: views x scales
    fitted_on: int  # training chips the detector was fitted on (0: needs no fitting)
    predict_seconds: float
    fit_seconds: float
    tta_seconds: float  # choosing the views on validation (0 when they are given)


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
    """The TTA views first (`infer.tta.views: auto`: chosen on `val_data()` = (validation dataset, its
    labels), see `resolve_views`); then the TTA forward over `test` with them; the OOD score of
    `detector`, fitted first (when it needs it) on `fit_data()` = (training dataset, its labels) with the
    same TTA (and, for a detector that needs them, on virtual anomalies of those chips seeded with
    `seed`); then cluster voting as planned on the validation split: tau, the OOD floor and k, and
    whether to vote at all."""
    settings = voting_settings(cfg)
    val_split = None if val_data is None else functools.cache(val_data)
    start = time.perf_counter()
    resolved = resolve_views(model, cfg, device, val_split)
    cfg = resolved.cfg
    tta_seconds = time.perf_counter() - start
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
    if settings.enabled and settings.needs_validation and val_split is not None:
        dataset, labels = val_split()
        v_scores, v_logits, v_emb = resolved.validation or predict(model, dataset, cfg, device)
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
        energy=ood_score(logits, "energy", cfg.ood.temperature), tta=resolved.choice, views=len(cfg.tta.views) * len(cfg.tta.scales),
        fitted_on=fitted_on, predict_seconds=predict_seconds, fit_seconds=fit_seconds, tta_seconds=tta_seconds,
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
