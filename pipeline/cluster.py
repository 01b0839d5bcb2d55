"""k-means (faiss) on test embeddings and winner-take-all label voting inside each cluster.

Voting rule: embeddings are L2-normalised and clustered. In each cluster the *voters* are the
members whose confidence (max probability) is at least `tau`. A cluster's vote is *applied* when
  - it has at least `min_voters` voters,
  - the voters are at least a share `min_voter_share` of the cluster's members, and
  - the most common label among its voters holds a share of at least `rho` of the voters.
In an applied cluster every non-voter member (confidence < `tau`) takes that label, but only when
the label is among the chip's own `top_k` most probable classes; otherwise it keeps its label.
Voters keep their own. Ties between labels go to the lowest class id. The first two guards stop one
confident chip (share 1.0 of one voter) from relabelling a whole cluster; the third stops a chip
from taking a label its own prediction all but rules out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np
import pandas as pd

from pipeline.errors import UserError

CLUSTER_TABLE_COLUMNS = (
    "cluster", "size", "voters", "voter_share", "winner", "share", "applied", "changed", "outside_top_k",
)
# Defaults of the guards (the profiles set them explicitly; see the module doc).
DEFAULT_MIN_VOTERS = 3
DEFAULT_MIN_VOTER_SHARE = 0.2
DEFAULT_TOP_K = 2


def faiss_gpu_available() -> bool:
    """True when this faiss build has GPU support and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def kmeans(
    x: np.ndarray, k: int, niter: int = 25, seed: int = 0, use_gpu: bool | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd k-means of `x` (N, D) with faiss: (assignments int64 (N,), centroids float32 (k, D)).

    Initial centroids are k points drawn with `seed`; every point is used (no faiss subsampling).
    `use_gpu=None` uses a GPU when the faiss build has one. CPU and GPU give the *same* clustering in
    this sense: same seed, same initial centroids, same iterations; only the order of float32
    arithmetic differs, so centroids agree to round-off and a point almost equidistant between two
    centroids may be assigned differently. On a CPU, repeated runs with one seed are identical.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"kmeans expects a 2-D array (N, D), got shape {x.shape}")
    n, dim = x.shape
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise UserError(f"cluster k={k!r} is invalid for {n} vectors: use an integer 1..{n} or 'auto'")
    if isinstance(niter, bool) or not isinstance(niter, (int, np.integer)) or niter < 1:
        raise UserError(f"cluster niter={niter!r} is invalid: a number of k-means iterations >= 1")
    if not np.isfinite(x).all():
        raise ValueError("kmeans input holds NaN or infinite values")
    gpu_available = faiss_gpu_available()
    if use_gpu and not gpu_available:
        raise UserError("k-means on GPU requested but this faiss has no GPU: install faiss-gpu or let it choose")
    gpu = gpu_available if use_gpu is None else use_gpu
    km = faiss.Kmeans(
        dim,
        int(k),
        niter=int(niter),
        seed=int(seed),
        gpu=bool(gpu),
        max_points_per_centroid=max(n, 1),  # cluster every point, never a sample
        min_points_per_centroid=1,  # no "too few points" warning on small test sets
        verbose=False,
    )
    km.train(x)
    _, assignments = km.assign(x)
    return assignments.astype(np.int64), km.centroids.astype(np.float32)


def auto_k(n: int, num_classes: int) -> int:
    """Number of clusters for `n` test images: round(sqrt(n / 2)), at least `num_classes` (one per
    class at least), at most n // 5 (clusters of five or more on average, so votes have company),
    and never below 1."""
    k = max(round(math.sqrt(n / 2)), num_classes)
    return max(1, min(k, n // 5))


@dataclass
class VotingResult:
    """Labels after voting, each image's cluster (-1 = not clustered), and one table row per cluster."""

    labels: np.ndarray  # int64 (N,): labels after voting
    labels_before: np.ndarray  # int64 (N,): argmax of probs
    cluster: np.ndarray  # int64 (N,)
    changed: np.ndarray  # bool (N,)
    cluster_table: pd.DataFrame  # columns CLUSTER_TABLE_COLUMNS
    k: int  # number of clusters (0 = no voting)


def _check_probs(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] == 0:
        raise ValueError(f"probs must be (N, C), got shape {probs.shape}")
    return probs


def no_vote(probs: np.ndarray) -> VotingResult:
    """The result of voting switched off: argmax labels, nothing clustered, nothing changed."""
    labels = _check_probs(probs).argmax(axis=1).astype(np.int64)
    return VotingResult(
        labels=labels,
        labels_before=labels.copy(),
        cluster=np.full(labels.shape, -1, dtype=np.int64),
        changed=np.zeros(labels.shape, dtype=bool),
        cluster_table=pd.DataFrame({c: [] for c in CLUSTER_TABLE_COLUMNS}),
        k=0,
    )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _resolve_k(k: int | str, n: int, num_classes: int) -> int:
    if k == "auto":
        return auto_k(n, num_classes)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise UserError(f"infer.cluster.k={k!r} is invalid for {n} test images: use an integer 1..{n} or 'auto'")
    return int(k)


def check_voting_settings(
    tau: float, rho: float, min_voters: int, min_voter_share: float, top_k: int
) -> None:
    """UserError naming the `infer.cluster` key whose value is out of range."""
    if not _is_number(tau) or not 0.0 <= tau <= 1.0:
        raise UserError(f"infer.cluster.tau={tau!r} is invalid: a confidence threshold in [0, 1]")
    if not _is_number(rho) or not 0.0 < rho <= 1.0:
        raise UserError(f"infer.cluster.rho={rho!r} is invalid: a share of the voters in (0, 1]")
    if isinstance(min_voters, bool) or not isinstance(min_voters, (int, np.integer)) or min_voters < 1:
        raise UserError(f"infer.cluster.min_voters={min_voters!r} is invalid: an integer >= 1, e.g. 3")
    if not _is_number(min_voter_share) or not 0.0 <= min_voter_share <= 1.0:
        raise UserError(
            f"infer.cluster.min_voter_share={min_voter_share!r} is invalid: "
            "a share of the cluster's members in [0, 1], e.g. 0.2"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise UserError(f"infer.cluster.top_k={top_k!r} is invalid: an integer >= 1, e.g. 2")


def cluster_vote(
    embeddings: np.ndarray,
    probs: np.ndarray,
    k: int | str,
    tau: float,
    rho: float,
    niter: int = 25,
    seed: int = 0,
    min_voters: int = DEFAULT_MIN_VOTERS,
    min_voter_share: float = DEFAULT_MIN_VOTER_SHARE,
    top_k: int = DEFAULT_TOP_K,
    eligible: np.ndarray | None = None,
) -> VotingResult:
    """Cluster L2-normalised `embeddings` (N, D) with k-means and apply the voting rule (module doc).

    `eligible` (bool (N,)) restricts clustering and voting to those chips (e.g. those that do not look
    out-of-distribution); the others keep their label and get cluster -1.
    """
    probs = _check_probs(probs)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    n, num_classes = probs.shape
    if embeddings.ndim != 2 or embeddings.shape[0] != n:
        raise ValueError(f"embeddings {embeddings.shape} do not match probs {probs.shape}")
    check_voting_settings(tau, rho, min_voters, min_voter_share, top_k)
    if eligible is not None:
        eligible = np.asarray(eligible, dtype=bool)
        if eligible.shape != (n,):
            raise ValueError(f"eligible {eligible.shape} does not match {n} chips")
        if not eligible.all():
            inner = cluster_vote(embeddings[eligible], probs[eligible], k, tau, rho, niter, seed, min_voters,
                                 min_voter_share, top_k) if eligible.sum() >= 1 else no_vote(probs[eligible])
            result = no_vote(probs)
            result.labels[eligible], result.cluster[eligible] = inner.labels, inner.cluster
            result.changed[eligible] = inner.changed
            result.cluster_table, result.k = inner.cluster_table, inner.k
            return result
    if n == 0:
        return no_vote(probs)
    k = _resolve_k(k, n, num_classes)

    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    unit = embeddings / np.maximum(norms, 1e-12)
    cluster, _ = kmeans(unit, k, niter=niter, seed=seed)

    before = probs.argmax(axis=1).astype(np.int64)
    is_voter = probs.max(axis=1) >= tau
    votes = np.bincount(
        cluster[is_voter] * num_classes + before[is_voter], minlength=k * num_classes
    ).reshape(k, num_classes)
    size = np.bincount(cluster, minlength=k)
    voters = votes.sum(axis=1)
    voter_share = voters / np.maximum(size, 1)
    winner = votes.argmax(axis=1)  # first maximum: ties go to the lowest class id
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(voters > 0, votes.max(axis=1) / np.maximum(voters, 1), np.nan)
    applied = (
        (voters >= min_voters)
        & (voter_share >= min_voter_share - 1e-12)
        & (share >= rho - 1e-12)
    )

    # A chip may only take a label among its own top-k classes (rank by probability, ties to the lower id).
    rank = np.argsort(np.argsort(-probs, axis=1, kind="stable"), axis=1, kind="stable")
    winner_rank = rank[np.arange(n), winner[cluster]]
    candidate = ~is_voter & applied[cluster]
    relabel = candidate & (winner_rank < int(top_k))
    labels = np.where(relabel, winner[cluster], before)
    changed = labels != before
    blocked = candidate & ~relabel
    table = pd.DataFrame(
        {
            "cluster": np.arange(k),
            "size": size,
            "voters": voters,
            "voter_share": voter_share,
            "winner": np.where(voters > 0, winner, -1),
            "share": share,
            "applied": applied,
            "changed": np.bincount(cluster[changed], minlength=k),
            "outside_top_k": np.bincount(cluster[blocked], minlength=k),
        }
    )
    return VotingResult(
        labels=labels, labels_before=before, cluster=cluster, changed=changed, cluster_table=table, k=k
    )


# ---------------------------------------------------------------------------------------------------
# Settings chosen on validation: tau from a quantile of validation confidences, chips that look
# out-of-distribution left out, the number of clusters from a simulation of voting on the validation
# split, and no voting at all when that simulation shows no gain.

@dataclass(frozen=True)
class VotingSettings:
    """`infer.cluster`, read in one place. `k` and `tau` may be numbers or chosen on validation."""

    enabled: bool
    k: int | str  # integer | auto (sqrt rule) | validation (mean cluster size chosen by simulate_voting)
    tau: float | str  # confidence to vote, or auto: the tau_quantile of validation confidences
    tau_quantile: float
    rho: float
    min_voters: int
    min_voter_share: float
    top_k: int
    niter: int
    ood_quantile: float  # chips scoring below this quantile of validation OOD scores are not clustered; 0 = all
    cluster_sizes: tuple[int, ...]  # k: validation candidates, as mean cluster sizes (k = eligible chips / size)
    require_gain: bool  # vote only when simulated voting raises validation balanced accuracy

    @classmethod
    def from_config(cls, section: dict) -> "VotingSettings":
        tau = section.get("tau", 0.9)
        k = section.get("k", "auto")
        settings = cls(
            enabled=bool(section.get("enabled", False)), k=k, tau=tau,
            tau_quantile=section.get("tau_quantile", 0.5), rho=section.get("rho", 0.6),
            min_voters=section.get("min_voters", DEFAULT_MIN_VOTERS),
            min_voter_share=section.get("min_voter_share", DEFAULT_MIN_VOTER_SHARE),
            top_k=section.get("top_k", DEFAULT_TOP_K), niter=section.get("niter", 25),
            ood_quantile=section.get("ood_quantile", 0.0),
            cluster_sizes=tuple(section.get("cluster_sizes") or (5, 10, 20, 40)),
            require_gain=bool(section.get("require_gain", False)),
        )
        settings.check()
        return settings

    def check(self) -> None:
        """UserError naming the `infer.cluster` key whose value is out of range."""
        check_voting_settings(0.5 if self.tau == "auto" else self.tau, self.rho, self.min_voters,
                              self.min_voter_share, self.top_k)
        if not (self.k in ("auto", "validation") or (isinstance(self.k, (int, np.integer)) and not isinstance(self.k, bool) and self.k >= 1)):
            raise UserError(f"infer.cluster.k={self.k!r} is invalid: an integer >= 1, auto or validation")
        if not _is_number(self.tau_quantile) or not 0.0 <= self.tau_quantile <= 1.0:
            raise UserError(f"infer.cluster.tau_quantile={self.tau_quantile!r} is invalid: a quantile in [0, 1]")
        if not _is_number(self.ood_quantile) or not 0.0 <= self.ood_quantile < 1.0:
            raise UserError(f"infer.cluster.ood_quantile={self.ood_quantile!r} is invalid: a quantile in [0, 1), 0 = off")
        if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 1 for c in self.cluster_sizes):
            raise UserError(f"infer.cluster.cluster_sizes={list(self.cluster_sizes)!r} is invalid: integers >= 1")

    @property
    def needs_validation(self) -> bool:
        return self.tau == "auto" or self.k == "validation" or self.ood_quantile > 0 or self.require_gain


def resolve_tau(settings: VotingSettings, val_confidence: np.ndarray | None) -> float:
    """The voting threshold: a number as given, or the `tau_quantile` quantile of validation confidences."""
    if settings.tau != "auto":
        return float(settings.tau)
    if val_confidence is None or len(val_confidence) == 0:
        raise UserError("infer.cluster.tau=auto needs validation chips: raise data.val_fraction")
    return float(np.quantile(np.asarray(val_confidence, dtype=np.float64), settings.tau_quantile))


def ood_floor(settings: VotingSettings, val_scores: np.ndarray | None) -> float | None:
    """The OOD score below which a chip is not clustered (quantile of validation scores); None = no floor."""
    if settings.ood_quantile <= 0 or val_scores is None or len(val_scores) == 0:
        return None
    return float(np.quantile(np.asarray(val_scores, dtype=np.float64), settings.ood_quantile))


def k_for_size(n: int, size: int, num_classes: int) -> int:
    """k for `n` chips at a mean cluster size `size`: at least one cluster per class (and at most n)."""
    return max(1, min(n, max(num_classes, round(n / size))))


def _balanced_accuracy(labels: np.ndarray, pred: np.ndarray) -> float:
    recalls = [float((pred[labels == c] == c).mean()) for c in np.unique(labels)]
    return float(np.mean(recalls)) if recalls else float("nan")


def simulate_voting(
    embeddings: np.ndarray, probs: np.ndarray, labels: np.ndarray, settings: VotingSettings, tau: float,
    eligible: np.ndarray | None = None, seed: int = 0, sizes: tuple[int, ...] | None = None,
) -> pd.DataFrame:
    """Voting on labelled (validation) chips, once per candidate mean cluster size: one row each with k,
    accuracy and balanced accuracy before and after, labels changed, and `gain` (balanced accuracy after
    minus before). k for each size is computed on the eligible chips, as on test."""
    probs = _check_probs(probs)
    labels = np.asarray(labels, dtype=np.int64)
    n_eligible = int(len(labels) if eligible is None else np.sum(eligible))
    before = probs.argmax(axis=1)
    rows = []
    for size in sizes or settings.cluster_sizes:
        k = k_for_size(n_eligible, int(size), probs.shape[1])
        result = cluster_vote(embeddings, probs, k, tau, settings.rho, settings.niter, seed, settings.min_voters,
                              settings.min_voter_share, settings.top_k, eligible=eligible)
        rows.append({
            "cluster_size": int(size), "k": k, "changed": int(result.changed.sum()),
            "accuracy_before": float((before == labels).mean()), "accuracy_after": float((result.labels == labels).mean()),
            "balanced_before": _balanced_accuracy(labels, before), "balanced_after": _balanced_accuracy(labels, result.labels),
        })
    table = pd.DataFrame(rows)
    table["gain"] = table["balanced_after"] - table["balanced_before"]
    return table


def choose_cluster_size(table: pd.DataFrame) -> int:
    """The candidate size with the highest simulated balanced accuracy (ties: the larger clusters, fewer k)."""
    best = table.sort_values(["balanced_after", "cluster_size"], ascending=[False, False]).iloc[0]
    return int(best["cluster_size"])


@dataclass
class VotingPlan:
    """What infer does: vote or not (and why), with which tau and k, on which test chips; the validation table."""

    vote: bool
    tau: float
    k: int | str
    floor: float | None
    eligible: np.ndarray  # bool (N test chips): clustered and voting
    reason: str
    validation: pd.DataFrame | None = None


def plan_voting(
    settings: VotingSettings, test_scores: np.ndarray, num_classes: int, seed: int,
    val_embeddings: np.ndarray | None = None, val_probs: np.ndarray | None = None,
    val_labels: np.ndarray | None = None, val_scores: np.ndarray | None = None,
) -> VotingPlan:
    """Resolve tau, the OOD floor and k from the validation split, and whether voting is worth it there.

    `test_scores` / `val_scores`: OOD scores (higher = more in-distribution) of the test / validation chips.
    """
    test_scores = np.asarray(test_scores, dtype=np.float64)
    everyone = np.ones(len(test_scores), dtype=bool)
    if not settings.enabled:
        return VotingPlan(False, float("nan"), 0, None, everyone, "infer.cluster.enabled is false")
    tau = resolve_tau(settings, None if val_probs is None else _check_probs(val_probs).max(axis=1))
    floor = ood_floor(settings, val_scores)
    eligible = everyone if floor is None else test_scores >= floor
    n_test = int(eligible.sum())
    k: int | str = settings.k
    table = None
    if n_test == 0:
        return VotingPlan(False, tau, 0, floor, eligible, "no test chip above the OOD floor")
    if settings.k == "validation" or settings.require_gain:
        if val_probs is None or val_labels is None or val_embeddings is None:
            raise UserError("infer.cluster: k=validation / require_gain need the validation split's predictions")
        val_eligible = None if floor is None or val_scores is None else np.asarray(val_scores) >= floor
        if settings.k == "validation":
            sizes = settings.cluster_sizes
        else:  # a fixed k or auto: simulated at the mean cluster size it gives on test
            fixed = auto_k(n_test, num_classes) if settings.k == "auto" else int(settings.k)
            sizes = (max(1, round(n_test / max(fixed, 1))),)
        table = simulate_voting(val_embeddings, val_probs, val_labels, settings, tau, val_eligible, seed, sizes)
        size = choose_cluster_size(table)
        if settings.k == "validation":
            k = k_for_size(n_test, size, num_classes)
        gain = float(table.loc[table["cluster_size"] == size, "gain"].iloc[0])
        if settings.require_gain and not gain > 0:
            return VotingPlan(False, tau, k, floor, eligible,
                              f"simulated voting on validation does not help (balanced accuracy {gain:+.4f})", table)
    return VotingPlan(True, tau, k, floor, eligible, "voting", table)
