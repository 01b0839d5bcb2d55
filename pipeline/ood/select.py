"""Choosing the OOD detector on validation data only, with training classes left out in turn.

The training classes have no unseen class, so one is made: for each class c, the detectors are
refitted on the training split WITHOUT c and scored on the validation split, where c's chips are the
out-of-distribution ones and every other chip is in-distribution (AUROC). The final model's head has
seen c, so logit-based detectors (and ViM, which needs a head) get a logistic-regression head refitted
on the cached training embeddings without c (class-balanced, on standardised features, mapped back
to a linear head on the raw embeddings; `refit_head`). Everything runs on cached TTA-averaged embeddings of the
final model; test data and test labels are never used. `choose` picks the winner: by default
(`select_ood.rule: one_se`) the earliest candidate, in the default order from the simplest scores to the
trained hypersphere head, whose mean AUROC over the left-out classes is within one standard error of the
best mean (Breiman's one-standard-error rule); `rule: best` takes the best mean (ties: the earlier).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import OODConfig, SelectOODConfig
from pipeline.errors import UserError
from pipeline.metrics import auroc
from pipeline.ood import make_detector
from pipeline.ood.knn import capped_rows


@dataclass
class Candidate:
    """One detector with fixed parameters (e.g. knn with k=5)."""

    label: str
    method: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class CandidateResult:
    candidate: Candidate
    per_class: dict[int, float]  # left-out class id -> AUROC

    @property
    def aurocs(self) -> np.ndarray:
        return np.array(list(self.per_class.values()), dtype=np.float64)

    @property
    def mean(self) -> float:
        return float(np.mean(self.aurocs))

    @property
    def se(self) -> float:
        """Standard error of the mean over left-out classes (NaN with one class)."""
        a = self.aurocs
        return float(np.std(a, ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("nan")


def candidates(select_cfg: SelectOODConfig) -> list[Candidate]:
    """The candidates of `select_ood.candidates`, knn once per `select_ood.knn_k`."""
    out = []
    for name in select_cfg.candidates:
        if name == "knn":
            out.extend(Candidate(f"knn(k={k})", "knn", {"k": k}) for k in select_cfg.knn_k)
        else:
            out.append(Candidate(str(name), str(name)))
    return out


def refit_head(
    embeddings: np.ndarray, labels: np.ndarray, c_reg: float = 1.0, max_iter: int = 200
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class-balanced multinomial logistic regression on `embeddings`, as a linear head on the raw
    embeddings: (weight (K, D), bias (K,), classes (K,)) with logits = x @ weight.T + bias.

    sklearn's objective with class_weight="balanced" (0.5·||W||² + C·sum of weighted losses, divided
    here by N): the mean over classes of each class's mean cross-entropy + ||W||² / (2·C·N), on
    standardised features, minimised by full-batch L-BFGS in float64 (torch, one thread: sklearn's
    solver took seconds per refit on 512-d embeddings)."""
    x = np.asarray(embeddings, dtype=np.float64)
    classes, y = np.unique(np.asarray(labels), return_inverse=True)
    mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-6)
    xs = torch.from_numpy((x - mean) / std)
    target = torch.from_numpy(y.astype(np.int64))
    class_weight = torch.from_numpy(len(y) / (len(classes) * np.bincount(y)))
    weight = torch.zeros(len(classes), x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(xs @ weight.T + bias, target, weight=class_weight, reduction="sum") / len(y)
        loss = loss + weight.pow(2).sum() / (2 * float(c_reg) * len(y))
        loss.backward()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: thread hand-offs cost more than they give (30x slower on a busy box)
    try:
        optimizer.step(objective)
    finally:
        torch.set_num_threads(threads)
    w = weight.detach().numpy() / std
    return w, bias.detach().numpy() - w @ mean, classes


def leave_one_class_out(
    train_emb: np.ndarray,
    train_labels: np.ndarray,
    val_emb: np.ndarray,
    val_labels: np.ndarray,
    cands: list[Candidate],
    ood_cfg: OODConfig,
    head_c: float = 1.0,
    max_per_class: int | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    anomaly_emb: np.ndarray | None = None,
    anomaly_source_labels: np.ndarray | None = None,
) -> list[CandidateResult]:
    """AUROC of every candidate with each class (present in training and validation) left out in turn.

    `anomaly_emb` (M, D): embeddings of virtual anomalies of the training chips, for candidates that
    need them, with `anomaly_source_labels` (M, 2) the classes of their two source chips: when class c
    is left out, anomalies made from a chip of c are left out too."""
    train_labels, val_labels = np.asarray(train_labels, np.int64), np.asarray(val_labels, np.int64)
    needs_anomalies = [make_detector(c.method, ood_cfg, seed=seed, **c.params).needs_anomalies for c in cands]
    if any(needs_anomalies) and (anomaly_emb is None or anomaly_source_labels is None):
        names = [c.label for c, n in zip(cands, needs_anomalies) if n]
        raise ValueError(f"candidates {', '.join(names)} need anomaly_emb and anomaly_source_labels")
    keep = capped_rows(train_labels, max_per_class, seed)
    train_emb, train_labels = np.asarray(train_emb)[keep], train_labels[keep]
    present = np.unique(train_labels)
    classes = [int(c) for c in present if (val_labels == c).any()]
    if len(present) < 3:
        raise UserError(
            f"leaving a class out needs at least 3 training classes, the training split has {len(present)}"
        )
    if not classes:
        raise UserError("the validation split has no chip of a training class: nothing to leave out")
    results = [CandidateResult(c, {}) for c in cands]
    for c in classes:
        tr = train_labels != c
        weight, bias, _ = refit_head(train_emb[tr], train_labels[tr], head_c)
        tr_logits = train_emb[tr] @ weight.T + bias
        val_logits = val_emb @ weight.T + bias
        is_in = val_labels != c
        anomalies_without_c = None
        if anomaly_emb is not None and anomaly_source_labels is not None:
            anomalies_without_c = np.asarray(anomaly_emb)[(np.asarray(anomaly_source_labels) != c).all(axis=1)]
        for result in results:
            cand = result.candidate
            detector = make_detector(cand.method, ood_cfg, seed=seed, **cand.params)
            detector.fit(tr_logits, train_emb[tr], train_labels[tr], head=(weight, bias), anomalies=anomalies_without_c)
            result.per_class[c] = auroc(is_in, detector.score(logits=val_logits, embeddings=val_emb))
        if progress is not None:
            progress(c)
    return results


def best(results: list[CandidateResult]) -> CandidateResult:
    """The candidate with the highest mean AUROC (the earliest one on ties)."""
    means = [r.mean if np.isfinite(r.mean) else -np.inf for r in results]
    return results[int(np.argmax(means))]


def one_standard_error(results: list[CandidateResult]) -> CandidateResult:
    """The earliest candidate whose mean AUROC is at least the best mean minus the best's standard error:
    detectors that validation cannot tell apart go to the simpler one (the earlier in `candidates`' order)."""
    top = best(results)
    floor = top.mean - (top.se if np.isfinite(top.se) else 0.0)
    return next(r for r in results if np.isfinite(r.mean) and r.mean >= floor)


RULES: dict[str, Callable[[list[CandidateResult]], CandidateResult]] = {"best": best, "one_se": one_standard_error}


def choose(results: list[CandidateResult], rule: str) -> CandidateResult:
    """The detector `select_ood.rule` picks from `results` (see RULES)."""
    return RULES[rule](results)


def proxy_groups(classes: list[int], folds: int, left_out: int, seed: int = 0) -> list[list[int]]:
    """The classes each proxy model leaves out: disjoint groups of `left_out` classes (fewer when only
    that many remain, never more than all but 2), drawn from a seeded permutation of `classes`."""
    classes = sorted(int(c) for c in classes)
    if len(classes) < 3:
        raise UserError(f"proxy folds need at least 3 training classes with validation chips, there are {len(classes)}")
    size = min(int(left_out), len(classes) - 2)
    order = [classes[i] for i in np.random.default_rng(seed).permutation(len(classes))]
    return [sorted(order[f * size:(f + 1) * size]) for f in range(min(int(folds), len(classes) // size))]


def score_unseen_classes(
    train_logits: np.ndarray,
    train_emb: np.ndarray,
    train_labels: np.ndarray,
    val_logits: np.ndarray,
    val_emb: np.ndarray,
    val_labels: np.ndarray,
    unseen: list[int],
    cands: list[Candidate],
    ood_cfg: OODConfig,
    head: tuple[np.ndarray, np.ndarray] | None = None,
    anomaly_emb: np.ndarray | None = None,
    seed: int = 0,
) -> list[dict[int, float]]:
    """For each candidate, {unseen class c: AUROC of c's validation chips against the validation chips of
    the seen classes}, every detector fitted on the training outputs of a model that never saw `unseen`
    (the training rows must hold no chip of them)."""
    train_labels, val_labels = np.asarray(train_labels, np.int64), np.asarray(val_labels, np.int64)
    if np.isin(train_labels, unseen).any():
        raise ValueError("the training rows hold chips of an unseen class")
    seen = ~np.isin(val_labels, unseen)
    out = []
    for cand in cands:
        detector = make_detector(cand.method, ood_cfg, seed=seed, **cand.params)
        detector.fit(train_logits, train_emb, train_labels, head=head, anomalies=anomaly_emb)
        scores = detector.score(logits=val_logits, embeddings=val_emb)
        rows_of = {c: seen | (val_labels == c) for c in unseen if (val_labels == c).any()}  # c against the seen only
        out.append({c: auroc(seen[rows], scores[rows]) for c, rows in rows_of.items()})
    return out
