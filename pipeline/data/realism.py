"""Realism check of the synthetic replica: a two-sample test of real against synthetic chips.

For one modality, chips are read from a real folder and a synthetic one (a dataset root, a modality
folder or any folder of images, searched at any depth) and compared three ways:
- a table of simple per-chip statistics (intensity percentiles, dark/bright fractions, mean, spread,
  local coefficient of variation, autocorrelation at lags 1/2/4, gradient energy, size): medians of
  real and of synthetic chips side by side;
- the cross-validated AUROC of a gradient-boosted classifier on those statistics telling real from
  synthetic (0.5: indistinguishable by these statistics; 1.0: always told apart), and that of a small
  CNN trained on the pixels (chips resized to CNN_SIDE px, so size is left to the statistics);
- a montage PNG of real chips (top rows) and synthetic ones (bottom rows).
Near-duplicate chips (`near_duplicate_groups`: the same scene imaged twice; 41% of the real 2022 EO chips have
one) are kept in one cross-validation fold, so neither classifier is scored on a chip whose twin it was trained on.
Results go to `<out>/<modality>.json` and `<out>/<modality>_montage.png`.

    python -m pipeline.data.realism --real ../shared/data/mavoc2022_sample --synthetic data/synthetic --modality sar
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.data.calibration import SUBSETS, autocorrelation, select_subset
from pipeline.errors import UserError, exit_on_user_error
from pipeline.log import make_console

MODALITY_FOLDERS = {  # child folders that hold a modality's chips in the accepted dataset layouts
    "sar": ("SAR_Train", "SAR_Test", "SAR", "SAR_VAL"),
    "eo": ("EO_Train", "EO", "EO_Test"),
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DARK, BRIGHT = 0.02, 0.98  # intensity thresholds of the dark and bright pixel fractions (0-1 scale)
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
LAGS = (1, 2, 4)
LOCAL_WINDOW = 5  # side of the window of the local coefficient of variation
CNN_SIDE = 32  # the CNN sees every chip resized to this side
FOLDS = 5
NEAR_DUPLICATE = 0.9  # pixel correlation above which two chips are one scene (`near_duplicate_groups`): the nearest
#                       other chip of 413 independently drawn synthetic EO chips passes it for about 1% of them
#                       (99th percentile 0.88-0.91), against 41% of the real EO chips and none of the real SAR chips
#                       (their highest: 0.65)
STATISTICS = (
    *(f"p{q:02d}" for q in PERCENTILES),
    "dark_fraction", "bright_fraction", "mean", "std", "local_cv",
    *(f"autocorr_lag{k}" for k in LAGS),
    "gradient_energy", "size",
)


# ----------------------------------------------------------------------------- reading


def chip_paths(folder: Path, modality: str) -> list[Path]:
    """Image files of `modality` under `folder`: inside its modality sub-folders if it has any, else all."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (expected a dataset root or a folder of chips)")
    children = {p.name.lower(): p for p in folder.iterdir() if p.is_dir()}
    roots = [children[n.lower()] for n in MODALITY_FOLDERS[modality] if n.lower() in children] or [folder]
    paths = sorted(p for root in roots for p in root.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not paths:
        raise UserError(f"{folder}: no {modality.upper()} images found (looked in "
                        f"{', '.join(str(r) for r in roots)} at any depth)")
    return paths


def read_chips(paths: list[Path], limit: int, rng: np.random.Generator) -> list[np.ndarray]:
    """At most `limit` chips (a seeded random subset), grayscale float32 in [0, 1]."""
    if len(paths) > limit:
        paths = [paths[i] for i in sorted(rng.choice(len(paths), limit, replace=False))]
    chips = []
    for path in paths:
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise UserError(f"cannot read image {path}: not a readable image file")
        if img.ndim == 3:
            img = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2GRAY)
        scale = 65535.0 if img.dtype == np.uint16 else 255.0
        chips.append(img.astype(np.float32) / scale)
    return chips


# ----------------------------------------------------------------------------- statistics


def chip_statistics(chip: np.ndarray) -> np.ndarray:
    """The STATISTICS of one chip (float image in [0, 1]), in that order."""
    x = chip.astype(np.float32)
    mean, std = float(x.mean()), float(x.std())
    local_mean = cv2.blur(x, (LOCAL_WINDOW, LOCAL_WINDOW))
    local_sq = cv2.blur(x * x, (LOCAL_WINDOW, LOCAL_WINDOW))
    local_std = np.sqrt(np.maximum(local_sq - local_mean**2, 0.0))
    local_cv = float(np.median(local_std / np.maximum(local_mean, 0.02)))
    z = x - mean
    gx, gy = cv2.Sobel(x, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(x, cv2.CV_32F, 0, 1, ksize=3)
    return np.array([
        *np.percentile(x, PERCENTILES),
        (x < DARK).mean(), (x > BRIGHT).mean(), mean, std, local_cv,
        *(autocorrelation(z, k) for k in LAGS),
        float((gx * gx + gy * gy).mean()), float(np.sqrt(x.size)),
    ], dtype=np.float64)


def statistics_table(chips: list[np.ndarray]) -> np.ndarray:
    """(n_chips, len(STATISTICS)) array of chip statistics."""
    return np.stack([chip_statistics(c) for c in chips])


def best_single_statistic(positive: np.ndarray, negative: np.ndarray) -> tuple[str, float]:
    """The statistic (name, AUROC folded to >= 0.5) that alone best tells two statistics tables apart."""
    from sklearn.metrics import roc_auc_score

    y = np.concatenate([np.ones(len(positive)), np.zeros(len(negative))])
    aurocs = [roc_auc_score(y, np.concatenate([positive[:, i], negative[:, i]])) for i in range(len(STATISTICS))]
    folded = [max(a, 1.0 - a) for a in aurocs]
    best = int(np.argmax(folded))
    return STATISTICS[best], float(folded[best])


# ----------------------------------------------------------------------------- near duplicates


def near_duplicate_groups(chips: list[np.ndarray], threshold: float = NEAR_DUPLICATE) -> np.ndarray:
    """A group label per chip: chips of one size whose pixels correlate above `threshold` (mean removed, the best of
    the 8 flips and quarter turns that keep the shape), directly or through a chain of such pairs, share a label;
    `threshold` 1 or more: every chip its own group."""
    import torch
    from scipy.sparse.csgraph import connected_components

    from pipeline.tta import DIHEDRAL_VIEWS, apply_view, keeps_shape

    if threshold >= 1.0:  # a correlation cannot pass 1 (rounding can, by 1e-16)
        return np.arange(len(chips))
    linked = np.zeros((len(chips), len(chips)), dtype=bool)
    for shape in {c.shape for c in chips}:
        index = np.array([i for i, c in enumerate(chips) if c.shape == shape])
        stack = torch.from_numpy(np.stack([chips[i] for i in index]).astype(np.float64))
        unit = _unit_rows(stack.numpy())
        best = np.full((len(index), len(index)), -1.0)
        for view in (v for v in DIHEDRAL_VIEWS if keeps_shape(v, *shape)):
            best = np.maximum(best, unit @ _unit_rows(apply_view(stack, view).numpy()).T)
        linked[np.ix_(index, index)] = best > threshold
    return connected_components(linked, directed=False)[1]


def _unit_rows(chips: np.ndarray) -> np.ndarray:
    """(n, h, w) chips as rows of unit length with their mean removed (a flat chip: zeros)."""
    rows = chips.reshape(len(chips), -1)
    rows = rows - rows.mean(axis=1, keepdims=True)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------- classifiers


def statistics_auroc(real: np.ndarray, synthetic: np.ndarray, seed: int = 0,
                     groups: np.ndarray | None = None) -> float:
    """Cross-validated AUROC of gradient boosting on the statistics telling real (positive) from synthetic.

    groups: a label per row (real rows, then synthetic), rows of one label kept in one fold (default: all apart)."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict

    from threadpoolctl import threadpool_limits

    x = np.concatenate([real, synthetic])
    y = np.concatenate([np.ones(len(real)), np.zeros(len(synthetic))])
    leaf = int(np.clip(len(y) // 20, 2, 20))  # sklearn's default 20, fewer for small samples
    model = HistGradientBoostingClassifier(max_iter=150, learning_rate=0.1, max_leaf_nodes=15, min_samples_leaf=leaf,
                                           random_state=seed)
    with threadpool_limits(1):  # tiny problem: OpenMP threads only contend (minutes on a loaded machine)
        proba = cross_val_predict(model, x, y, cv=_splits(y, groups, seed), method="predict_proba")[:, 1]
    return float(roc_auc_score(y, proba))


def _splits(y: np.ndarray, groups: np.ndarray | None, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs of the stratified cross-validation, `groups` kept whole; with every group a single
    row, exactly the folds of plain stratified k-fold."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if groups is None or len(np.unique(groups)) == len(y):
        return list(StratifiedKFold(_folds(y), shuffle=True, random_state=seed).split(y, y))
    per_side = min(len(np.unique(groups[y == side])) for side in (0, 1))
    return list(StratifiedGroupKFold(_folds(y, per_side), shuffle=True, random_state=seed).split(y, y, groups))


def _folds(y: np.ndarray, smaller: int | None = None) -> int:
    """Folds for labels `y`: FOLDS, fewer when a side has fewer chips (or `smaller` distinct groups)."""
    smaller = int(min((y == 1).sum(), (y == 0).sum())) if smaller is None else smaller
    if smaller < 2:
        raise UserError(f"too few chips to cross-validate: {smaller} on one side (need at least 2 per side, "
                        f"near duplicates counted once)")
    return min(FOLDS, smaller)


def _cnn_input(chips: list[np.ndarray]) -> np.ndarray:
    return np.stack([cv2.resize(c, (CNN_SIDE, CNN_SIDE), interpolation=cv2.INTER_AREA) for c in chips])[:, None]


def cnn_auroc(real: list[np.ndarray], synthetic: list[np.ndarray], epochs: int = 8, seed: int = 0,
              groups: np.ndarray | None = None) -> float:
    """Cross-validated AUROC of a small CNN (CPU, a few epochs) telling real (positive) from synthetic chips; `groups`
    as in `statistics_auroc`."""
    import torch
    from sklearn.metrics import roc_auc_score

    x = torch.from_numpy(np.concatenate([_cnn_input(real), _cnn_input(synthetic)]))
    y = np.concatenate([np.ones(len(real)), np.zeros(len(synthetic))])
    yt = torch.from_numpy(y).float()
    scores = np.zeros(len(y))
    generator = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny net: one thread is as fast and does not contend with other work
    try:
        _fit_folds(x, yt, _splits(y, groups, seed), scores, epochs, seed, generator)
    finally:
        torch.set_num_threads(threads)
    return float(roc_auc_score(y, scores))


def _fit_folds(x, yt, splits: list[tuple[np.ndarray, np.ndarray]], scores: np.ndarray, epochs: int, seed: int,
               generator) -> None:
    """Train one small CNN per cross-validation fold; write its held-out logits into `scores`."""
    import torch
    from torch import nn

    for fold, (train, test) in enumerate(splits):
        torch.manual_seed(seed * 100 + fold)
        net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(64, 1),
        )
        optimiser = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
        train_t = torch.from_numpy(train)
        for _ in range(epochs):
            net.train()
            for batch in train_t[torch.randperm(len(train_t), generator=generator)].split(64):
                loss = nn.functional.binary_cross_entropy_with_logits(net(x[batch])[:, 0], yt[batch])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        net.eval()
        with torch.no_grad():
            scores[test] = net(x[torch.from_numpy(test)])[:, 0].numpy()


# ----------------------------------------------------------------------------- montage


def write_montage(real: list[np.ndarray], synthetic: list[np.ndarray], path: Path, title: str,
                  per_row: int = 12, rows: int = 3) -> None:
    """PNG of `rows` rows of real chips above `rows` rows of synthetic chips, each at its own size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = per_row * rows
    fig, axes = plt.subplots(2 * rows, per_row, figsize=(per_row * 0.9, 2 * rows * 0.95 + 0.6))
    axes = np.atleast_2d(axes)
    for side, chips in enumerate((real, synthetic)):
        for k in range(count):
            ax = axes[side * rows + k // per_row, k % per_row]
            ax.set_xticks([]), ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if k < len(chips):
                ax.imshow(chips[k], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        axes[side * rows, 0].set_ylabel("real" if side == 0 else "synthetic", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- the test


@dataclass
class RealismResult:
    """Outcome of the two-sample test of one modality."""

    modality: str
    n_real: int
    n_synthetic: int
    medians: dict[str, tuple[float, float]]  # statistic -> (real median, synthetic median)
    statistics_auroc: float
    cnn_auroc: float | None
    real_subset: str = "all"  # which real chips: all, or the calibration's fit / holdout half
    scenes: tuple[int, int] = (0, 0)  # distinct scenes (near-duplicate groups) among the real and synthetic chips
    near_duplicate: float = NEAR_DUPLICATE  # the correlation that made them

    def as_json(self) -> dict:
        return {
            "modality": self.modality, "real_subset": self.real_subset, "n_real": self.n_real,
            "n_synthetic": self.n_synthetic, "near_duplicate": self.near_duplicate,
            "real_scenes": self.scenes[0], "synthetic_scenes": self.scenes[1],
            "statistics_auroc": round(self.statistics_auroc, 4),
            "cnn_auroc": None if self.cnn_auroc is None else round(self.cnn_auroc, 4),
            "medians": {k: {"real": round(r, 4), "synthetic": round(s, 4)} for k, (r, s) in self.medians.items()},
        }


def compare(real_dir: Path, synthetic_dir: Path, modality: str = "sar", limit: int = 500, seed: int = 0,
            cnn_epochs: int = 8, montage: Path | None = None, real_subset: str = "all",
            near_duplicate: float = NEAR_DUPLICATE) -> RealismResult:
    """The two-sample test of one modality (cnn_epochs 0: no CNN classifier).

    real_subset 'fit' / 'holdout': only that half of the real chips (pipeline.data.calibration.split_ids):
    the calibration table of the generator is made from the fit half, so 'holdout' measures unseen chips.
    near_duplicate: chips correlating above it stay in one fold (`near_duplicate_groups`; 1 or more: none do)."""
    if modality not in MODALITY_FOLDERS:
        raise UserError(f"modality '{modality}': expected one of {', '.join(MODALITY_FOLDERS)}")
    if limit < 2:
        raise UserError(f"--limit {limit}: expected at least 2 chips per side")
    rng = np.random.default_rng(seed)
    real_paths = select_subset(chip_paths(real_dir, modality), real_subset)
    if real_subset != "all" and len(real_paths) < 2:
        raise UserError(f"{real_dir}: {len(real_paths)} {modality.upper()} chip(s) in the {real_subset} half "
                        f"(need at least 2)")
    real = read_chips(real_paths, limit, rng)
    synthetic = read_chips(chip_paths(synthetic_dir, modality), limit, rng)
    real_stats, synthetic_stats = statistics_table(real), statistics_table(synthetic)
    medians = {name: (float(np.median(real_stats[:, i])), float(np.median(synthetic_stats[:, i])))
               for i, name in enumerate(STATISTICS)}
    real_groups, synthetic_groups = (near_duplicate_groups(c, near_duplicate) for c in (real, synthetic))
    groups = np.concatenate([real_groups, real_groups.max() + 1 + synthetic_groups])
    auroc = statistics_auroc(real_stats, synthetic_stats, seed, groups)
    cnn = cnn_auroc(real, synthetic, cnn_epochs, seed, groups) if cnn_epochs > 0 else None
    if montage is not None:
        write_montage(real, synthetic, montage, f"{modality.upper()}: real (top) vs synthetic (bottom)")
    scenes = (len(np.unique(real_groups)), len(np.unique(synthetic_groups)))
    return RealismResult(modality, len(real), len(synthetic), medians, auroc, cnn, real_subset, scenes, near_duplicate)


def _table(result: RealismResult):
    from rich.table import Table

    half = "" if result.real_subset == "all" else f" ({result.real_subset} half)"
    table = Table(title=f"{result.modality.upper()} realism: {result.n_real} real{half} vs {result.n_synthetic} synthetic "
                        f"chips ({result.scenes[0]} and {result.scenes[1]} distinct scenes: correlation <= "
                        f"{result.near_duplicate:g})")
    table.add_column("statistic")
    table.add_column("real median", justify="right")
    table.add_column("synthetic median", justify="right")
    for name, (r, s) in result.medians.items():
        table.add_row(name, f"{r:.3f}", f"{s:.3f}")
    return table


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.data.realism", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--real", type=Path, required=True, help="folder of real chips (dataset root or image folder)")
    p.add_argument("--synthetic", type=Path, required=True, help="folder of synthetic chips (e.g. data/synthetic)")
    p.add_argument("--modality", choices=tuple(MODALITY_FOLDERS), default="sar")
    p.add_argument("--out", type=Path, default=Path("realism"), help="folder for <modality>.json and the montage")
    p.add_argument("--limit", type=int, default=500, help="at most this many chips per side (seeded random subset)")
    p.add_argument("--cnn-epochs", type=int, default=8, help="epochs of the CNN classifier per fold (0: skip it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real-subset", choices=SUBSETS, default="all",
                   help="real chips to compare with: all, or the half of them the generator's calibration table was "
                        "fitted on (fit) or not (holdout), split by chip id (pipeline.data.calibration)")
    p.add_argument("--near-duplicate", type=float, default=NEAR_DUPLICATE,
                   help="chips whose pixels correlate above this (best of the 8 flips and quarter turns) are one scene "
                        "and stay in one cross-validation fold; 1 turns it off")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    if args.cnn_epochs < 0:
        raise UserError(f"--cnn-epochs {args.cnn_epochs}: expected 0 or more")
    if not 0.0 < args.near_duplicate:
        raise UserError(f"--near-duplicate {args.near_duplicate}: expected a correlation above 0 (1: off)")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create --out {args.out}: {err.strerror or err}") from None
    if not os.access(args.out, os.W_OK):
        raise UserError(f"--out {args.out} is not writable")
    montage = args.out / f"{args.modality}_montage.png"
    result = compare(args.real, args.synthetic, args.modality, args.limit, args.seed, args.cnn_epochs, montage,
                     args.real_subset, args.near_duplicate)
    console = make_console()
    console.print(_table(result))
    cnn = "n/a (skipped)" if result.cnn_auroc is None else f"{result.cnn_auroc:.3f}"
    console.print(f"real-vs-synthetic AUROC (cross-validated, 0.5 = indistinguishable): statistics classifier "
                  f"{result.statistics_auroc:.3f}, CNN {cnn}", highlight=False)
    report = {**result.as_json(), "real": str(args.real), "synthetic": str(args.synthetic), "montage": str(montage)}
    (args.out / f"{args.modality}.json").write_text(json.dumps(report, indent=1) + "\n")
    console.print(f"wrote {args.out / (args.modality + '.json')} and {montage}", highlight=False)


if __name__ == "__main__":
    main()
