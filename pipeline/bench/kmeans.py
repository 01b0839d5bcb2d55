"""Benchmark: faiss k-means (pipeline.cluster.kmeans) vs scikit-learn KMeans on random vectors.

Both run plain Lloyd iterations from k randomly chosen points (sklearn: init='random', n_init=1,
algorithm='lloyd', tol=0) for the same number of iterations on all points, on all CPU cores.

    python -m pipeline.bench.kmeans --n 100000 --d 512 --k 100 --niter 20
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from rich.console import Console
from rich.table import Table
from sklearn.cluster import KMeans

from pipeline.cluster import faiss_gpu_available, kmeans


def _inertia(x: np.ndarray, assignments: np.ndarray, centroids: np.ndarray) -> float:
    """Sum of squared distances of the points to their assigned centroid."""
    total = 0.0
    for start in range(0, len(x), 16384):
        part = slice(start, start + 16384)
        total += float(((x[part] - centroids[assignments[part]]) ** 2).sum(dtype=np.float64))
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="number of vectors")
    parser.add_argument("--d", type=int, default=512, help="dimension")
    parser.add_argument("--k", type=int, default=100, help="number of clusters")
    parser.add_argument("--niter", type=int, default=20, help="Lloyd iterations")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    x = np.random.default_rng(args.seed).standard_normal((args.n, args.d), dtype=np.float32)
    use_gpu = faiss_gpu_available()

    start = time.perf_counter()
    assign_faiss, centroids_faiss = kmeans(x, args.k, niter=args.niter, seed=args.seed, use_gpu=use_gpu)
    faiss_s = time.perf_counter() - start

    start = time.perf_counter()
    km = KMeans(
        n_clusters=args.k, init="random", n_init=1, algorithm="lloyd", max_iter=args.niter, tol=0.0,
        random_state=args.seed,
    ).fit(x)
    sklearn_s = time.perf_counter() - start

    table = Table(
        title=f"k-means: n={args.n:,} d={args.d} k={args.k} iterations={args.niter}, {os.cpu_count()} CPU cores"
    )
    table.add_column("implementation")
    table.add_column("time (s)", justify="right")
    table.add_column("iterations", justify="right")
    table.add_column("inertia", justify="right")
    table.add_column("speed-up vs sklearn", justify="right")
    table.add_row(
        f"faiss ({'GPU' if use_gpu else 'CPU'})", f"{faiss_s:.2f}", str(args.niter),
        f"{_inertia(x, assign_faiss, centroids_faiss):.4g}", f"{sklearn_s / faiss_s:.1f}x",
    )
    table.add_row(
        "scikit-learn KMeans (lloyd)", f"{sklearn_s:.2f}", str(km.n_iter_),
        f"{_inertia(x, km.labels_.astype(np.int64), km.cluster_centers_.astype(np.float32)):.4g}", "1.0x",
    )
    Console().print(table)


if __name__ == "__main__":
    main()
