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
) -> VotingResult:
    """Cluster L2-normalised `embeddings` (N, D) with k-means and apply the voting rule (module doc)."""
    probs = _check_probs(probs)
    embeddings = np.asarray(embeddings, dtype=np.float32)
    n, num_classes = probs.shape
    if embeddings.ndim != 2 or embeddings.shape[0] != n:
        raise ValueError(f"embeddings {embeddings.shape} do not match probs {probs.shape}")
    check_voting_settings(tau, rho, min_voters, min_voter_share, top_k)
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
