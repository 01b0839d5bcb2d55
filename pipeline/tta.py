"""Test-time augmentation: the eight flips/90° rotations of a chip at several scales, one forward;
and the choice of the views on the validation split (`choose_views`, for infer.tta.views: auto).

A model is any `nn.Module` with `embed(x) -> (B, D)` and `head(emb) -> (B, C)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import logsumexp
from torch import Tensor, nn

from pipeline.errors import UserError
from pipeline.metrics import classification_metrics, paired_balanced_accuracy_gain

# Shift views move the chip's content by this fraction of its side (at least 1 px): 3 px of a 100-px
# MSTAR pack (88-px window + 6-px margin), 2 px of a 63-px competition SAR pack. Within the training
# translation margin, so these windows are ones the model was trained on.
SHIFT_FRACTION = 0.03


def shift(x: Tensor, dy: int, dx: int) -> Tensor:
    """`x` (..., H, W) with its content moved down `dy` and right `dx` px (negative: up / left); the
    uncovered border is reflected, so no wrapped-around pixels enter a centred window."""
    h, w = x.shape[-2:]
    if abs(dy) >= h or abs(dx) >= w:
        raise ValueError(f"shift ({dy}, {dx}) px does not fit a {h}x{w} image")
    flat = x.reshape(-1, 1, h, w)  # F.pad's reflect mode wants (N, C, H, W)
    padded = F.pad(flat, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), mode="reflect")
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top : top + h, left : left + w].reshape(x.shape)


def _shift_view(dy: int, dx: int) -> Callable[[Tensor], Tensor]:
    def view(x: Tensor) -> Tensor:
        step = max(1, round(SHIFT_FRACTION * min(x.shape[-2:])))
        return shift(x, dy * step, dx * step)
    return view


# The dihedral group of the square (every view a vehicle seen from above can take), and four small
# translations (radar geometry unchanged: the views to use when flips are not trained).
_VIEWS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda x: x,
    "hflip": lambda x: x.flip(-1),  # mirror left-right
    "vflip": lambda x: x.flip(-2),  # mirror top-bottom
    "rot90": lambda x: torch.rot90(x, 1, dims=(-2, -1)),
    "rot180": lambda x: torch.rot90(x, 2, dims=(-2, -1)),
    "rot270": lambda x: torch.rot90(x, 3, dims=(-2, -1)),
    "transpose": lambda x: x.transpose(-2, -1),  # mirror about the main diagonal
    "transverse": lambda x: x.flip(-2, -1).transpose(-2, -1),  # mirror about the anti-diagonal
    "shift_up": _shift_view(-1, 0),
    "shift_down": _shift_view(1, 0),
    "shift_left": _shift_view(0, -1),
    "shift_right": _shift_view(0, 1),
}
VIEW_NAMES = tuple(_VIEWS)
SHIFT_VIEWS = tuple(v for v in VIEW_NAMES if v.startswith("shift_"))
DIHEDRAL_VIEWS = tuple(v for v in VIEW_NAMES if v not in SHIFT_VIEWS)
# Views that swap height and width (need square inputs to be batched with the others).
_SWAPS_AXES = frozenset({"rot90", "rot270", "transpose", "transverse"})
AVERAGE_MODES = ("logits", "probs")


def check_views(views: list[str] | tuple[str, ...]) -> None:
    """UserError unless `views` is a non-empty list of names from VIEW_NAMES."""
    if len(views) == 0:
        raise UserError(f"infer.tta.views is empty: give at least one of {', '.join(VIEW_NAMES)}")
    unknown = [v for v in views if v not in VIEW_NAMES]
    if unknown:
        raise UserError(
            f"unknown TTA view(s) {', '.join(map(str, unknown))}: valid views are {', '.join(VIEW_NAMES)}"
        )


def keeps_shape(view: str, height: int, width: int) -> bool:
    """Whether `view` of a height x width image has its shape (a quarter turn or transpose of a non-square one not)."""
    return height == width or view not in _SWAPS_AXES


def apply_view(x: Tensor, view: str) -> Tensor:
    """The `view` of images `x` (..., H, W); rotations are counter-clockwise like `np.rot90`."""
    if view not in _VIEWS:
        check_views([view])
    return _VIEWS[view](x)


def _reflect_pad_to(x: Tensor, height: int, width: int) -> Tensor:
    """Reflect-pad (..., h, w) to (..., height, width), centred; repeats while the pad exceeds the image."""
    while x.shape[-2] < height or x.shape[-1] < width:
        h, w = x.shape[-2:]
        if min(h, w) < 2:  # a 1-pixel side has nothing to reflect
            return F.pad(x, _centred_pad(height - h, width - w), mode="replicate")
        pad_h, pad_w = min(height - h, 2 * (h - 1)), min(width - w, 2 * (w - 1))
        x = F.pad(x, _centred_pad(pad_h, pad_w), mode="reflect")
    return x


def _centred_pad(pad_h: int, pad_w: int) -> tuple[int, int, int, int]:
    return (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)


def rescale(x: Tensor, scale: float) -> Tensor:
    """Zoom float images (B, C, H, W) by `scale` (bilinear, antialiased), then centre-crop or
    reflect-pad back to H×W (a strong zoom-out shows mirrored copies of the chip around it)."""
    _check_scales([scale])
    if scale == 1.0:
        return x
    height, width = x.shape[-2:]
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    if (new_h, new_w) == (height, width):
        return x
    y = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
    if new_h > height or new_w > width:
        top, left = max(new_h - height, 0) // 2, max(new_w - width, 0) // 2
        y = y[..., top : top + min(new_h, height), left : left + min(new_w, width)]
    return _reflect_pad_to(y, height, width)


def _check_scales(scales: list[float] | tuple[float, ...]) -> None:
    if len(scales) == 0:
        raise UserError("infer.tta.scales is empty: give at least one scale, e.g. [1.0]")
    for s in scales:
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not (math.isfinite(s) and s > 0):
            raise UserError(f"TTA scale {s!r} is invalid: scales must be positive numbers such as 0.9, 1.0, 1.1")


def tta_batch(x: Tensor, views: list[str], scales: list[float]) -> Tensor:
    """All scales × views of `x` (B, C, H, W) stacked as (S·V·B, C, H, W): scale-major, then view."""
    check_views(views)
    _check_scales(scales)
    if x.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
    height, width = x.shape[-2:]
    if not all(keeps_shape(v, height, width) for v in views):
        swapping = sorted({v for v in views if not keeps_shape(v, height, width)})
        raise UserError(
            f"TTA views {', '.join(swapping)} need square images, got {height}x{width}: "
            "resize chips to a square size or drop those views"
        )
    return torch.cat([apply_view(rescale(x, s), v) for s in scales for v in views], dim=0)


class TTAOutput(NamedTuple):
    """What `predict_tta` returns, each averaged over all views × scales (float32)."""

    class_scores: Tensor  # (B, C) for the class decision: mean logits, or log of the mean probabilities
    embeddings: Tensor  # (B, D) mean embeddings, for clustering
    logits: Tensor  # (B, C) mean raw logits whatever `average` is: for OOD scores (energy, max-logit)


@torch.no_grad()
def predict_tta(
    model: nn.Module,
    x: Tensor,
    views: list[str],
    scales: list[float],
    average: str = "logits",
    max_batch: int | None = None,
) -> TTAOutput:
    """TTA class scores, embeddings and logits of images `x` (B, C_in, H, W), see `TTAOutput`.

    All views × scales go through ONE batched forward (`embed` then `head`), or through chunks of at
    most `max_batch` images when that is set. `average` only decides `class_scores`: `"logits"` gives
    the mean logits; `"probs"` averages softmax probabilities and gives their log (log-probabilities,
    so softmax of it gives the averaged probabilities back). `logits` is always the mean of the raw
    logits: log-probabilities would make energy constant (logsumexp of them is 0) and turn max-logit
    into log-MSP, so OOD scores are computed from `logits`. Embeddings are averaged over all views.
    The model runs in eval mode and its training flag is restored afterwards, even on error. Outputs
    are float32 on the model's output device.
    """
    if average not in AVERAGE_MODES:
        raise UserError(f"infer.tta.average '{average}' is invalid: choose one of {', '.join(AVERAGE_MODES)}")
    if max_batch is not None and max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    batch = x.shape[0]
    if batch == 0:
        raise ValueError("predict_tta got an empty batch")
    stacked = tta_batch(x, views, scales)
    n_views = len(views) * len(scales)
    was_training = model.training
    model.eval()
    try:
        chunk = stacked.shape[0] if max_batch is None else max_batch
        embeddings, logits = [], []
        for start in range(0, stacked.shape[0], chunk):
            emb = model.embed(stacked[start : start + chunk])
            embeddings.append(emb.float())
            logits.append(model.head(emb).float())
    finally:
        model.train(was_training)
    emb_all = torch.cat(embeddings).reshape(n_views, batch, -1)
    logits_all = torch.cat(logits).reshape(n_views, batch, -1)
    mean_logits = logits_all.mean(dim=0)
    if average == "logits":
        class_scores = mean_logits
    else:  # log of the mean probability, computed stably in log space
        class_scores = torch.logsumexp(torch.log_softmax(logits_all, dim=-1), dim=0) - math.log(n_views)
    return TTAOutput(class_scores=class_scores, embeddings=emb_all.mean(dim=0), logits=mean_logits)


# --- views chosen on validation (infer.tta.views: auto) -----------------------------------------------


def combine_class_scores(per_view: list[np.ndarray], average: str) -> np.ndarray:
    """The class scores of a view set from each view's own class scores (each averaged over the same
    scales), exactly as `predict_tta` would give them for the whole set: the mean of the mean logits, or
    the log of the mean of the per-view mean probabilities."""
    if average not in AVERAGE_MODES:
        raise UserError(f"infer.tta.average '{average}' is invalid: choose one of {', '.join(AVERAGE_MODES)}")
    stacked = np.stack([np.asarray(s, dtype=np.float64) for s in per_view])
    if average == "logits":
        return stacked.mean(axis=0)
    return logsumexp(stacked, axis=0) - math.log(len(per_view))


@dataclass
class ViewChoice:
    """The TTA views infer uses, why, and (when chosen on validation) every candidate's score there."""

    views: list[str]
    reason: str
    auto: bool = False
    table: list[dict[str, Any]] = field(default_factory=list)  # one row per candidate set, see `choose_views`

    def record(self) -> dict[str, Any]:
        """For summary.json."""
        return {"views": list(self.views), "auto": self.auto, "reason": self.reason, "validation": self.table or None}

    def describe(self) -> str:
        """One line for the log."""
        if not self.table:
            return f"TTA views {'+'.join(self.views)} ({self.reason})"
        chosen = next(r for r in self.table if r["chosen"])
        return (f"TTA views {'+'.join(self.views)} chosen on validation: balanced accuracy {chosen['balanced_accuracy']:.4f} "
                f"± {chosen['se']:.4f} ({self.reason})")


def _set_name(views: list[str] | tuple[str, ...]) -> str:
    return "+".join(views)


def choose_views(
    per_view_scores: dict[str, np.ndarray], labels: np.ndarray, candidates: list[list[str]], average: str,
    min_gain_se: float, baseline: list[str] | tuple[str, ...] = ("identity",),
) -> ViewChoice:
    """The baseline view set, unless a candidate beats it on validation: then the best one (ties go to fewer views).

    `per_view_scores[v]`: validation class scores (N, C) of view `v` alone (averaged over the scales);
    `labels`: the validation labels. `baseline` (infer.tta.baseline) and identity alone are always compared,
    and another set replaces the baseline only if its gain over it exceeds `min_gain_se` paired standard
    errors (0: any gain), so a noisy or saturated validation split keeps the baseline (a set that only ties it
    does not replace it, even with fewer views). The table rows:
    views, n_views, balanced_accuracy, se (its binomial standard error), gain and gain_se (over the baseline,
    paired), chosen.
    """
    for views in [*candidates, list(baseline)]:
        check_views(views)
    labels = np.asarray(labels, dtype=np.int64)
    sets: list[tuple[str, ...]] = [tuple(baseline)]
    for views in [["identity"], *candidates]:
        if tuple(views) not in sets:
            sets.append(tuple(views))
    missing = sorted({v for s in sets for v in s} - set(per_view_scores))
    if missing:
        raise ValueError(f"no validation scores for view(s) {', '.join(missing)}")
    num_classes = next(iter(per_view_scores.values())).shape[1]
    preds = [combine_class_scores([per_view_scores[v] for v in views], average).argmax(axis=1) for views in sets]
    rows, baseline_pred = [], preds[0]
    for views, pred in zip(sets, preds):
        metrics = classification_metrics(labels, pred, num_classes)
        gain, gain_se = paired_balanced_accuracy_gain(labels, baseline_pred, pred)
        rows.append({"views": _set_name(views), "n_views": len(views), "balanced_accuracy": metrics["balanced_accuracy"],
                     "se": metrics["balanced_accuracy_se"], "gain": gain, "gain_se": gain_se})
    eligible = [0] + [i for i in range(1, len(rows)) if rows[i]["gain"] > 0 and rows[i]["gain"] > min_gain_se * rows[i]["gain_se"]]
    best = min(eligible, key=lambda i: (-rows[i]["balanced_accuracy"], rows[i]["n_views"], i))
    for i, row in enumerate(rows):
        row["chosen"] = i == best
    kept = "identity alone" if sets[0] == ("identity",) else f"the baseline {rows[0]['views']}"
    if best != 0:
        reason = f"beats {kept} on validation by {rows[best]['gain']:+.4f} ± {rows[best]['gain_se']:.4f} balanced accuracy"
    elif min_gain_se > 0 and any(r["gain"] > 0 for r in rows):
        reason = f"no candidate set beats {kept} on validation by more than {min_gain_se:g} paired standard errors"
    else:
        reason = f"no candidate set beats {kept} on validation"
    return ViewChoice(list(sets[best]), reason, auto=True, table=rows)
