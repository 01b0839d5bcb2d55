"""Losses: focal / cross-entropy / improved cross-entropy with per-class alpha, knowledge distillation, feature alignment.

Conventions chosen here:
- `FocalLoss` reduces by the plain mean of per-sample terms `alpha_y (1-p_y)^gamma CE_i`, where
  `CE_i` is the cross-entropy against the label-smoothed target (smoothing enters the log-prob
  term only; the modulating factor uses the probability of the true class). With gamma=0 and no
  alpha it equals `F.cross_entropy(..., label_smoothing=eps)`; with alpha it is NOT torch's
  weighted mean (which divides by the sum of weights) but `mean(alpha_y * CE_i)`.
- Alphas from `class_alpha` average 1 over the classes present in the training counts, so the loss
  scale does not depend on the weighting kind; absent classes get alpha 0.
- Masked terms (KD, feature alignment) average over the rows where the mask (has_eo) is True and
  are an exact 0 that still touches every parameter when no row is selected (DDP-safe).
- Teacher logits and features are targets: they are detached.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import UserError

ALPHA_KINDS = ("none", "inverse_freq", "effective_number")
FEATURE_LOSSES = ("cosine", "mse")
LOSS_KINDS = ("focal", "ce", "ice")


class FocalLoss(nn.Module):
    """-alpha_y (1 - p_y)^gamma * sum_c q_c log p_c, q = label-smoothed one-hot; mean over the batch."""

    def __init__(self, gamma: float = 2.0, alpha: Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if gamma < 0:
            raise UserError(f"focal gamma must be >= 0, got {gamma}")
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.gamma = float(gamma)
        self.label_smoothing = float(label_smoothing)
        self.register_buffer("alpha", None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32))

    def per_sample(self, logits: Tensor, target: Tensor) -> Tensor:
        """The unreduced loss (B,)."""
        log_probs = F.log_softmax(logits.float(), dim=1)
        log_p_true = log_probs.gather(1, target[:, None]).squeeze(1)
        if self.label_smoothing > 0:
            eps = self.label_smoothing
            ce = -(1.0 - eps) * log_p_true - eps * log_probs.mean(dim=1)
        else:
            ce = -log_p_true
        if self.gamma > 0:
            ce = (1.0 - log_p_true.exp()).clamp_min(1e-12).pow(self.gamma) * ce
        if self.alpha is not None:
            ce = self.alpha.to(ce.device, non_blocking=True)[target] * ce
        return ce

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.per_sample(logits, target).mean()


class ImprovedCrossEntropy(FocalLoss):
    """Improved cross-entropy (Bahri et al., IEEE GRSL 2019): CE_i + (max_k p_k - p_y), mean over the batch.

    The gap is 0 when the prediction is right and the probability margin of the wrong winner otherwise.
    CE_i is label-smoothed as in FocalLoss; a per-class alpha scales the whole per-sample term.
    """

    def __init__(self, alpha: Tensor | None = None, label_smoothing: float = 0.0) -> None:
        super().__init__(gamma=0.0, alpha=alpha, label_smoothing=label_smoothing)

    def per_sample(self, logits: Tensor, target: Tensor) -> Tensor:
        probs = F.softmax(logits.float(), dim=1)
        gap = probs.max(dim=1).values - probs.gather(1, target[:, None]).squeeze(1)
        if self.alpha is not None:
            gap = self.alpha.to(gap.device, non_blocking=True)[target] * gap
        return super().per_sample(logits, target) + gap


def class_alpha(
    kind: str | Sequence[float] | None, class_counts: np.ndarray, beta: float = 0.999
) -> Tensor | None:
    """Per-class alpha: none | inverse_freq | effective_number (Cui et al.) | explicit list.

    Normalised so the alphas of classes with a non-zero count average 1; zero-count classes get 0.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    present = counts > 0
    if not present.any():
        raise UserError("class counts are all zero: the training split holds no labelled chips")
    if kind is None or (isinstance(kind, str) and kind.lower() == "none"):
        return None
    if isinstance(kind, str):
        if kind == "inverse_freq":
            raw = np.where(present, 1.0 / np.maximum(counts, 1.0), 0.0)
        elif kind == "effective_number":
            if not 0.0 <= beta < 1.0:
                raise UserError(f"loss.beta must be in [0, 1) for effective_number, got {beta}")
            raw = np.where(present, (1.0 - beta) / (1.0 - np.power(beta, np.maximum(counts, 1.0))), 0.0)
        else:
            raise UserError(f"loss.alpha '{kind}' is unknown: use one of {', '.join(ALPHA_KINDS)} or a list of floats")
    else:
        try:
            raw = np.asarray([float(a) for a in kind], dtype=np.float64)
        except (TypeError, ValueError):
            raise UserError(f"loss.alpha list must hold numbers, got {kind!r}") from None
        if raw.shape != counts.shape:
            raise UserError(f"loss.alpha list has {raw.size} values, expected one per class ({counts.size})")
        if (raw < 0).any() or not np.isfinite(raw).all():
            raise UserError(f"loss.alpha values must be finite and >= 0, got {kind!r}")
        raw = np.where(present, raw, 0.0)
    if raw[present].sum() <= 0:
        raise UserError(f"loss.alpha {kind!r} gives every present class weight 0")
    alpha = raw / raw[present].mean()
    return torch.tensor(alpha, dtype=torch.float32)


def build_classification_loss(loss_cfg: dict[str, Any], class_counts: np.ndarray) -> FocalLoss:
    """The supervised loss of a stage's `loss` section: focal, ce (= focal with gamma 0) or ice (ce + probability gap)."""
    kind = loss_cfg.get("kind", "focal")
    if kind not in LOSS_KINDS:
        raise UserError(f"loss.kind '{kind}' is unknown: use one of {', '.join(LOSS_KINDS)}")
    alpha = class_alpha(loss_cfg.get("alpha"), class_counts, float(loss_cfg.get("beta", 0.999)))
    if kind == "ice":
        return ImprovedCrossEntropy(alpha=alpha, label_smoothing=float(loss_cfg.get("label_smoothing", 0.0)))
    gamma = float(loss_cfg.get("gamma", 2.0)) if kind == "focal" else 0.0
    return FocalLoss(gamma=gamma, alpha=alpha, label_smoothing=float(loss_cfg.get("label_smoothing", 0.0)))


def _masked_mean(per_row: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return per_row.mean()
    weight = mask.to(per_row.dtype).reshape(-1)
    return (per_row * weight).sum() / weight.sum().clamp_min(1.0)


def kd_kl_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float, mask: Tensor | None = None) -> Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the rows where `mask` is True (0 if none)."""
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    per_row = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return (t * t) * _masked_mean(per_row, mask)


class FeatureAlignment(nn.Module):
    """Project student embeddings to the teacher's width; `cosine` = 1 - cos, `mse` = elementwise MSE.

    The MSE compares with the raw (detached) teacher features: the projection learns their scale.
    """

    def __init__(self, student_dim: int, teacher_dim: int, kind: str = "cosine") -> None:
        super().__init__()
        if kind not in FEATURE_LOSSES:
            raise UserError(f"distill.feature_loss '{kind}' is unknown: use one of {', '.join(FEATURE_LOSSES)}")
        self.kind = kind
        self.projection = nn.Linear(student_dim, teacher_dim)

    def forward(self, student_emb: Tensor, teacher_emb: Tensor, mask: Tensor | None = None) -> Tensor:
        projected = self.projection(student_emb.float())
        target = teacher_emb.detach().float()
        if self.kind == "cosine":
            per_row = 1.0 - F.cosine_similarity(projected, target, dim=1, eps=1e-8)
        else:
            per_row = (projected - target).pow(2).mean(dim=1)
        return _masked_mean(per_row, mask)


class DistillationLoss(nn.Module):
    """supervised_weight * (focal|ce) + kd_weight * T^2 KL + feature_weight * alignment -> (total, parts).

    Built from a stage's `distill` section (temperature, kd_weight, supervised_weight, feature_weight,
    feature_loss). The feature projection lives here, so the task's trainable module must hold this
    loss. `parts` holds the detached unweighted terms: sup, kd, feat (kd/feat only when active).
    """

    def __init__(self, supervised: nn.Module, distill_cfg: dict[str, Any], student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.supervised = supervised
        self.temperature = float(distill_cfg.get("temperature", 4.0))
        self.kd_weight = float(distill_cfg.get("kd_weight", 1.0))
        self.supervised_weight = float(distill_cfg.get("supervised_weight", 1.0))
        self.feature_weight = float(distill_cfg.get("feature_weight", 0.0))
        if self.temperature <= 0:
            raise UserError(f"distill.temperature must be > 0, got {self.temperature}")
        for name in ("kd_weight", "supervised_weight", "feature_weight"):
            if not getattr(self, name) >= 0:
                raise UserError(f"distill.{name} must be >= 0, got {getattr(self, name)}")
        self.alignment = (
            FeatureAlignment(student_dim, teacher_dim, str(distill_cfg.get("feature_loss", "cosine")))
            if self.feature_weight > 0
            else None
        )

    def forward(
        self,
        student_logits: Tensor,
        student_emb: Tensor,
        teacher_logits: Tensor | None,
        teacher_emb: Tensor | None,
        labels: Tensor,
        mask: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        supervised = self.supervised(student_logits, labels)
        total = self.supervised_weight * supervised
        parts = {"sup": supervised.detach()}
        if self.kd_weight > 0 and teacher_logits is not None:
            kd = kd_kl_loss(student_logits, teacher_logits, self.temperature, mask)
            total = total + self.kd_weight * kd
            parts["kd"] = kd.detach()
        if self.alignment is not None and teacher_emb is not None:
            feat = self.alignment(student_emb, teacher_emb, mask)
            total = total + self.feature_weight * feat
            parts["feat"] = feat.detach()
        return total, parts
