"""The report's plots: numpy/pandas in, PNG bytes out (matplotlib's Agg canvas, no display, no pyplot).

Every function draws one figure with a title, axis labels and class names, renders it with
`FigureCanvasAgg` (the Agg backend, used explicitly rather than switched on globally, so importing
this module never changes the backend of a notebook that imports the pipeline) and returns the PNG.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DEFAULT_DPI = 100
IN_COLOR, OUT_COLOR = "#1f77b4", "#d62728"  # in-distribution blue, out-of-distribution red


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _png(fig: Figure, dpi: int) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _short(name: str, width: int = 14) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def confusion_png(matrix: np.ndarray, class_names: Sequence[str], normalize: bool, dpi: int = DEFAULT_DPI) -> bytes:
    """Heat map of a confusion matrix (rows true, columns predicted): counts, or each row divided by its total."""
    counts = np.asarray(matrix, dtype=np.float64)
    n = counts.shape[0]
    if counts.shape != (n, n) or len(class_names) != n:
        raise ValueError(f"confusion matrix {counts.shape} does not match {len(class_names)} class names")
    with np.errstate(invalid="ignore", divide="ignore"):
        values = counts / counts.sum(axis=1, keepdims=True) if normalize else counts
    values = np.nan_to_num(values)
    size = 3.0 + 0.5 * n
    fig, (ax,) = _figure(size + 1.0, size)
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else max(values.max(), 1.0))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class" if normalize else "chips")
    names = [_short(c) for c in class_names]
    ax.set_xticks(range(n), names, rotation=45, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix, row-normalised" if normalize else "Confusion matrix, counts")
    threshold = 0.5 * (1.0 if normalize else max(values.max(), 1.0))
    for i in range(n):
        for j in range(n):
            if counts[i, j] == 0:
                continue
            text = f"{values[i, j]:.2f}" if normalize else f"{int(counts[i, j])}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7 if n > 6 else 9,
                    color="white" if values[i, j] > threshold else "black")
    return _png(fig, dpi)


def recall_png(
    recall: Sequence[float | None], support: Sequence[int], class_names: Sequence[str], dpi: int = DEFAULT_DPI
) -> bytes:
    """Per-class recall bars (a class without test chips is marked n/a), each labelled with its support."""
    n = len(class_names)
    values = np.array([np.nan if r is None else float(r) for r in recall], dtype=np.float64)
    if values.shape != (n,) or len(support) != n:
        raise ValueError("recall, support and class names must have one entry per class")
    fig, (ax,) = _figure(3.0 + 0.55 * n, 4.0)
    ax.bar(range(n), np.nan_to_num(values), color=IN_COLOR)
    for i, (r, s) in enumerate(zip(values, support)):
        label = f"n={int(s)}" if np.isfinite(r) else "n/a"
        ax.text(i, (0.0 if not np.isfinite(r) else r) + 0.02, label, ha="center", va="bottom", fontsize=8)
    present = np.isfinite(values)
    title = "Per-class recall (in-distribution test chips; n = support)"
    if present.any():
        mean = float(values[present].mean())
        ax.axhline(mean, color="gray", linestyle="--", linewidth=1)
        title += f"\ndashed: balanced accuracy {mean:.3f}"
    ax.set_xticks(range(n), [_short(c) for c in class_names], rotation=45, ha="right")
    ax.set_ylim(0, 1.12)
    ax.set_xlabel("true class")
    ax.set_ylabel("recall")
    ax.set_title(title)
    return _png(fig, dpi)


def _bins(*arrays: np.ndarray, bins: int = 40) -> np.ndarray:
    values = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays if len(a)])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.linspace(0.0, 1.0, bins + 1)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, bins + 1)


def ood_histogram_png(
    score: np.ndarray, is_in: np.ndarray | None, method: str = "OOD", dpi: int = DEFAULT_DPI
) -> bytes:
    """Histogram of the OOD score: in- vs out-of-distribution chips when `is_in` is given, else all chips."""
    score = np.asarray(score, dtype=np.float64)
    fig, (ax,) = _figure(6.5, 4.0)
    if is_in is None:
        ax.hist(score, bins=_bins(score), color="gray", alpha=0.85, label=f"all test chips (n={score.size})")
        ax.set_title(f"{method} score of the test chips (no truth: in/out unknown)")
    else:
        is_in = np.asarray(is_in, dtype=bool)
        bins = _bins(score)
        ax.hist(score[is_in], bins=bins, color=IN_COLOR, alpha=0.6, label=f"in-distribution (n={int(is_in.sum())})")
        ax.hist(score[~is_in], bins=bins, color=OUT_COLOR, alpha=0.6, label=f"out-of-distribution (n={int((~is_in).sum())})")
        ax.set_title(f"{method} score: in- vs out-of-distribution test chips")
    ax.set_xlabel("OOD score (higher = more in-distribution)")
    ax.set_ylabel("test chips")
    ax.legend(fontsize=8)
    return _png(fig, dpi)


def roc_png(is_in: np.ndarray, score: np.ndarray, dpi: int = DEFAULT_DPI) -> bytes:
    """ROC curve of the OOD score with in-distribution as the positive class, AUROC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    is_in = np.asarray(is_in, dtype=bool)
    if is_in.all() or not is_in.any():
        raise ValueError("a ROC curve needs both in- and out-of-distribution chips")
    score = np.asarray(score, dtype=np.float64)
    fpr, tpr, _ = roc_curve(is_in, score)
    auc = roc_auc_score(is_in, score)
    fig, (ax,) = _figure(4.8, 4.5)
    ax.plot(fpr, tpr, color=IN_COLOR, linewidth=2, label=f"AUROC {auc:.4f}")
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (OOD chips scored as in-distribution)")
    ax.set_ylabel("true positive rate (in-distribution chips)")
    ax.set_title("ROC of the OOD score")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig, dpi)


def training_curves_png(history: pd.DataFrame, artifact: str, dpi: int = DEFAULT_DPI) -> bytes:
    """Loss (training parts and validation) and validation balanced accuracy ± 1 SE per epoch of one stage."""
    if "epoch" not in history.columns or len(history) == 0:
        raise ValueError(f"{artifact}: metrics table has no epoch rows")
    epoch = pd.to_numeric(history["epoch"], errors="coerce").to_numpy(np.float64)
    fig, (loss_ax, acc_ax) = _figure(10.0, 3.8, ncols=2)
    marker = "o" if len(history) < 30 else None
    loss_columns = [c for c in history.columns if c.startswith("train_")] + (["val_loss"] if "val_loss" in history else [])
    for column in loss_columns:
        values = pd.to_numeric(history[column], errors="coerce").to_numpy(np.float64)
        if np.isfinite(values).any():
            style = "--" if column == "val_loss" else "-"
            label = "validation NLL" if column == "val_loss" else "training " + column.removeprefix("train_").replace("_", " ")
            loss_ax.plot(epoch, values, style, marker=marker, label=label)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title(f"{artifact}: losses")
    if loss_ax.lines:
        loss_ax.legend(fontsize=7)
    if "val_balanced_accuracy" in history:
        bal = pd.to_numeric(history["val_balanced_accuracy"], errors="coerce").to_numpy(np.float64)
        se = pd.to_numeric(history.get("val_balanced_accuracy_se", pd.Series(np.zeros(len(history)))), errors="coerce")
        se = np.nan_to_num(se.to_numpy(np.float64))
        acc_ax.fill_between(epoch, bal - se, bal + se, color=IN_COLOR, alpha=0.25, label="± 1 standard error")
        acc_ax.errorbar(epoch, bal, yerr=se, color=IN_COLOR, marker=marker, capsize=3, label="balanced accuracy")
    if "val_accuracy" in history:
        acc = pd.to_numeric(history["val_accuracy"], errors="coerce").to_numpy(np.float64)
        acc_ax.plot(epoch, acc, color="gray", linestyle=":", marker=marker, label="accuracy")
    acc_ax.set_ylim(0, 1.02)
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("validation accuracy")
    acc_ax.set_title(f"{artifact}: validation balanced accuracy")
    acc_ax.legend(fontsize=7, loc="lower right")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(history) == 1:
            ax.set_xlim(epoch[0] - 1, epoch[0] + 1)
    return _png(fig, dpi)


VOTE_OUTCOMES = (
    ("wrong_to_right", "wrong → right", "#2ca02c"),
    ("right_to_wrong", "right → wrong", OUT_COLOR),
    ("wrong_to_wrong", "wrong → wrong", "#ff7f0e"),
    ("ood", "OOD chip", "#9467bd"),
    ("unknown", "changed (truth unknown)", "gray"),
)


def voting_png(per_cluster: pd.DataFrame, dpi: int = DEFAULT_DPI, max_clusters: int = 40) -> bytes:
    """Stacked bars of the labels cluster voting changed, per cluster, by outcome.

    `per_cluster` has a `cluster` column and one count column per outcome in VOTE_OUTCOMES (absent = 0);
    clusters with the most changes come first, at most `max_clusters` of them.
    """
    table = per_cluster.copy()
    for key, _, _ in VOTE_OUTCOMES:
        if key not in table:
            table[key] = 0
    keys = [k for k, _, _ in VOTE_OUTCOMES]
    table["total"] = table[keys].sum(axis=1)
    table = table[table["total"] > 0].sort_values(["total", "cluster"], ascending=[False, True]).head(max_clusters)
    fig, (ax,) = _figure(max(5.0, 1.5 + 0.3 * len(table)), 4.0)
    if len(table) == 0:
        ax.text(0.5, 0.5, "cluster voting changed no label", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
    else:
        x = np.arange(len(table))
        bottom = np.zeros(len(table))
        for key, label, color in VOTE_OUTCOMES:
            values = table[key].to_numpy(np.float64)
            if values.any():
                ax.bar(x, values, bottom=bottom, color=color, label=f"{label} ({int(values.sum())})")
                bottom += values
        ax.set_xticks(x, [str(c) for c in table["cluster"]], rotation=90 if len(table) > 15 else 0, fontsize=8)
        ax.legend(fontsize=8)
    ax.set_xlabel("cluster (most changes first)")
    ax.set_ylabel("labels changed")
    ax.set_title("Cluster voting: labels changed per cluster")
    return _png(fig, dpi)


def gallery_png(images: Sequence[np.ndarray], captions: Sequence[str], title: str, dpi: int = DEFAULT_DPI) -> bytes:
    """A row-wrapped grid of grayscale thumbnails with a caption under each."""
    if not images or len(images) != len(captions):
        raise ValueError("a gallery needs at least one image and one caption per image")
    cols = min(len(images), 8)
    rows = (len(images) + cols - 1) // cols
    lines = max(str(c).count("\n") + 1 for c in captions)
    fig = Figure(figsize=(1.5 * cols, (1.45 + 0.16 * lines) * rows + 0.4))
    FigureCanvasAgg(fig)
    for i, (image, caption) in enumerate(zip(images, captions)):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(np.asarray(image), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(caption, fontsize=6.5)
    fig.suptitle(title, fontsize=10)
    return _png(fig, dpi)


def ablation_png(summary: pd.DataFrame, metric: str, dpi: int = DEFAULT_DPI) -> bytes:
    """Bars of `metric` per variant (mean over seeds) with ± 1 standard-error whiskers.

    `summary` has columns variant, `<metric>` (mean), `<metric>_se` and seeds.
    """
    fig, (ax,) = _figure(max(5.0, 1.5 + 0.7 * len(summary)), 4.0)
    x = np.arange(len(summary))
    mean = summary[metric].to_numpy(np.float64)
    se = np.nan_to_num(summary.get(f"{metric}_se", pd.Series(np.zeros(len(summary)))).to_numpy(np.float64))
    ax.bar(x, mean, yerr=se, capsize=4, color=IN_COLOR)
    for i, (m, n) in enumerate(zip(mean, summary["seeds"])):
        ax.text(i, m, f"{m:.3f}\n({int(n)} seed{'s' if n != 1 else ''})", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [_short(str(v), 18) for v in summary["variant"]], rotation=30, ha="right")
    ax.set_xlabel("variant")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(f"Ablation: {metric.replace('_', ' ')} per variant (mean ± 1 SE over seeds)")
    return _png(fig, dpi)


def robustness_png(table: pd.DataFrame, dpi: int = DEFAULT_DPI) -> bytes:
    """Accuracy against attack strength eps, one line per (artifact, split, attack) present in `table`."""
    fig, (ax,) = _figure(6.5, 4.0)
    group_columns = [c for c in ("artifact", "split", "attack") if c in table.columns]
    groups = table.groupby(group_columns, sort=True) if group_columns else [((), table)]
    for key, part in groups:
        part = part.sort_values("eps")
        label = " / ".join(str(k) for k in (key if isinstance(key, tuple) else (key,))) or "accuracy"
        ax.plot(part["eps"].to_numpy(np.float64), part["accuracy"].to_numpy(np.float64), marker="o", label=label)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("attack strength eps")
    ax.set_ylabel("accuracy under attack")
    ax.set_title("Robustness: accuracy vs attack strength")
    ax.legend(fontsize=7)
    return _png(fig, dpi)


def recall_difference_png(
    recall_a: Sequence[float | None], recall_b: Sequence[float | None], class_names: Sequence[str],
    labels: tuple[str, str], dpi: int = DEFAULT_DPI,
) -> bytes:
    """Per-class recall of run B minus run A (green: B better), classes absent from either marked n/a."""
    a = np.array([np.nan if r is None else float(r) for r in recall_a], dtype=np.float64)
    b = np.array([np.nan if r is None else float(r) for r in recall_b], dtype=np.float64)
    diff = b - a
    n = len(class_names)
    fig, (ax,) = _figure(3.0 + 0.55 * n, 4.0)
    colors = ["#2ca02c" if d >= 0 else OUT_COLOR for d in np.nan_to_num(diff)]
    ax.bar(range(n), np.nan_to_num(diff), color=colors)
    for i, d in enumerate(diff):
        ax.text(i, 0 if not np.isfinite(d) else d, "n/a" if not np.isfinite(d) else f"{d:+.2f}",
                ha="center", va="bottom" if not np.isfinite(d) or d >= 0 else "top", fontsize=7)
    ax.axhline(0, color="black", linewidth=0.8)
    limit = max(0.1, float(np.nanmax(np.abs(diff))) * 1.25) if np.isfinite(diff).any() else 1.0
    ax.set_ylim(-limit, limit)
    ax.set_xticks(range(n), [_short(c) for c in class_names], rotation=45, ha="right")
    ax.set_xlabel("true class")
    ax.set_ylabel(f"recall {labels[1]} − {labels[0]}")
    ax.set_title(f"Per-class recall difference ({labels[1]} − {labels[0]})")
    return _png(fig, dpi)


def ood_overlay_png(runs: Sequence[tuple[str, np.ndarray, np.ndarray | None]], dpi: int = DEFAULT_DPI) -> bytes:
    """OOD score histograms of several runs overlaid: (label, score, is_in or None) per run.

    With truth a run draws its in-distribution chips filled and its OOD chips as an outline; without,
    all its chips filled.
    """
    fig, (ax,) = _figure(7.0, 4.2)
    colors = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd")
    bins = _bins(*[np.asarray(score, dtype=np.float64) for _, score, _ in runs])  # one set of bins: comparable heights
    for i, (label, score, is_in) in enumerate(runs):
        score = np.asarray(score, dtype=np.float64)
        color = colors[i % len(colors)]
        if is_in is None:
            ax.hist(score, bins=bins, color=color, alpha=0.45, label=f"{label}: all chips")
        else:
            is_in = np.asarray(is_in, dtype=bool)
            ax.hist(score[is_in], bins=bins, color=color, alpha=0.45, label=f"{label}: in-distribution")
            ax.hist(score[~is_in], bins=bins, color=color, histtype="step", linewidth=2, label=f"{label}: OOD")
    ax.set_xlabel("OOD score (higher = more in-distribution; scales differ between detectors)")
    ax.set_ylabel("test chips")
    ax.set_title("OOD score distributions, runs overlaid")
    ax.legend(fontsize=7)
    return _png(fig, dpi)
