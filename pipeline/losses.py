"""Losses: focal / cross-entropy / improved cross-entropy with per-class alpha, knowledge distillation,
feature alignment; LogitNorm and outlier exposure with virtual anomalies (OOD-minded training options).

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

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import ANOMALY_KINDS, DistillConfig, LossConfig, OutlierExposureConfig
from pipeline.errors import UserError
from pipeline.ood.anomalies import batch_anomalies
from pipeline.ood.anomalies import check_kinds as check_anomaly_kinds

ALPHA_KINDS = ("none", "inverse_freq", "effective_number")
FEATURE_LOSSES = ("cosine", "mse")
FEATURE_NORMS = ("none", "batch", "running")
KD_GATES = ("none", "correct", "confidence")


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


def build_classification_loss(loss_cfg: LossConfig, class_counts: np.ndarray) -> nn.Module:
    """The supervised loss of a stage's `loss` section: focal, ce (= focal with gamma 0) or ice (ce + the
    probability gap); wrapped in LogitNorm when `loss.logit_norm` is set."""
    alpha = class_alpha(loss_cfg.alpha, class_counts, loss_cfg.beta)
    if loss_cfg.kind == "ice":
        loss: nn.Module = ImprovedCrossEntropy(alpha=alpha, label_smoothing=loss_cfg.label_smoothing)
    else:
        gamma = loss_cfg.gamma if loss_cfg.kind == "focal" else 0.0
        loss = FocalLoss(gamma=gamma, alpha=alpha, label_smoothing=loss_cfg.label_smoothing)
    return loss if loss_cfg.logit_norm is None else LogitNormLoss(loss, loss_cfg.logit_norm)


class LogitNormLoss(nn.Module):
    """LogitNorm (Wei et al., ICML 2022): `inner(logits / (tau * ||logits||), target)`, so the loss
    cannot be lowered by growing the logit norm, which keeps unseen chips from confident logits."""

    def __init__(self, inner: nn.Module, tau: float) -> None:
        super().__init__()
        if not tau > 0:
            raise UserError(f"loss.logit_norm={tau!r} is invalid: a positive temperature such as 0.04, or null")
        self.inner = inner
        self.tau = float(tau)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = logits.float()
        norms = logits.norm(p=2, dim=1, keepdim=True).clamp_min(1e-7)
        return self.inner(logits / (self.tau * norms), target)


def uniform_kl(logits: Tensor) -> Tensor:
    """Mean over rows of KL(uniform || softmax(logits)) = cross-entropy to the uniform distribution
    minus log C: the outlier-exposure loss of Hendrycks et al. (2019) shifted to be 0 at uniform."""
    log_probs = F.log_softmax(logits.float(), dim=1)
    return (-log_probs.mean(dim=1) - math.log(logits.shape[1])).mean()


class OutlierExposure:
    """Outlier exposure with virtual anomalies made on the fly from each training batch
    (`distill_sar.outlier_exposure`): extra loss = weight * KL(uniform || softmax(anomaly logits))."""

    def __init__(self, weight: float, per_batch: float = 0.5, kinds: Sequence[str] = ANOMALY_KINDS, seed: int = 0) -> None:
        if not weight > 0 or not 0 < per_batch <= 1:
            raise UserError(f"outlier_exposure needs weight > 0 and 0 < per_batch <= 1, got {weight}, {per_batch}")
        self.weight, self.per_batch = float(weight), float(per_batch)
        self.kinds = check_anomaly_kinds(kinds, "distill_sar.outlier_exposure.kinds")
        self.rng = np.random.default_rng(seed)

    @classmethod
    def from_config(cls, oe_cfg: OutlierExposureConfig, seed: int = 0) -> "OutlierExposure | None":
        """The option of the config section, or None when its weight is 0 (off)."""
        return None if oe_cfg.weight == 0 else cls(oe_cfg.weight, oe_cfg.per_batch, oe_cfg.kinds, seed)

    def anomalies(self, images: Tensor, labels: Tensor) -> Tensor:
        count = max(1, int(round(self.per_batch * len(images))))
        return batch_anomalies(images, labels, count, self.rng, self.kinds)

    def loss(self, anomaly_logits: Tensor) -> Tensor:
        return self.weight * uniform_kl(anomaly_logits)


def forward_with_outliers(
    forward: Callable[[Tensor], Any], images: Tensor, labels: Tensor, exposure: OutlierExposure | None
) -> tuple[Any, Tensor | None]:
    """(`forward(images)`, None) without outlier exposure; with it, one forward of the batch followed by
    its virtual anomalies (one batch, so batch-norm sees both), split back: (outputs of the batch's
    own chips, the weighted outlier-exposure loss). `forward` returns logits or (logits, ...)."""
    if exposure is None:
        return forward(images), None
    n = len(images)
    out = forward(torch.cat([images, exposure.anomalies(images, labels).to(images.dtype)]))
    if isinstance(out, tuple):
        return tuple(o[:n] for o in out), exposure.loss(out[0][n:])
    return out[:n], exposure.loss(out[n:])


def _masked_mean(per_row: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return per_row.mean()
    weight = mask.to(per_row.dtype).reshape(-1)
    return (per_row * weight).sum() / weight.sum().clamp_min(1.0)


def kd_kl_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, mask: Tensor | None = None,
    weight: Tensor | None = None,
) -> Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the rows where `mask` is True (0 if none).

    `weight` (B,) scales each row's term (the teacher gate); the average still divides by the number of
    masked rows, so a gate that closes on most rows makes the whole term smaller, not the open rows louder.
    """
    t = float(temperature)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    per_row = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    if weight is not None:
        per_row = per_row * weight.detach().to(per_row.dtype).reshape(-1)
    return (t * t) * _masked_mean(per_row, mask)


def teacher_gate(teacher_logits: Tensor, labels: Tensor, gate: str) -> Tensor | None:
    """Per-row weight of the KD term: none -> None (every row 1); correct -> 1 where the teacher's argmax
    is the label, else 0; confidence -> the teacher's probability (T = 1) of the true class."""
    if gate == "none":
        return None
    logits = teacher_logits.detach().float()
    if gate == "correct":
        return (logits.argmax(dim=1) == labels).float()
    if gate == "confidence":
        return F.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)
    raise UserError(f"distill.gate '{gate}' is unknown: use one of {', '.join(KD_GATES)}")


class FeatureAlignment(nn.Module):
    """Project student embeddings to the teacher's width; `cosine` = 1 - cos, `mse` = elementwise MSE.

    `norm` says what the target is:
    - `none`: the raw (detached) teacher features; the projection learns their scale. Post-ReLU
      teacher features share a large positive mean, so a constant output already scores well.
    - `batch` / `running`: teacher features centred and standardised per dimension, with the statistics
      of the masked rows of the batch, or running statistics (momentum `momentum`, updated in training
      mode); for `cosine` the projected student features are centred on their batch mean too. No bias
      shortcut: a constant student scores 1 - cos = 1 (cosine) and at best mean(z^2) = 1 (mse, batch).
    """

    def __init__(self, student_dim: int, teacher_dim: int, kind: str = "cosine", norm: str = "none",
                 momentum: float = 0.1) -> None:
        super().__init__()
        if kind not in FEATURE_LOSSES:
            raise UserError(f"distill.feature_loss '{kind}' is unknown: use one of {', '.join(FEATURE_LOSSES)}")
        if norm not in FEATURE_NORMS:
            raise UserError(f"distill.feature_norm '{norm}' is unknown: use one of {', '.join(FEATURE_NORMS)}")
        self.kind = kind
        self.norm = norm
        self.momentum = float(momentum)
        self.projection = nn.Linear(student_dim, teacher_dim)
        self.register_buffer("running_mean", torch.zeros(teacher_dim))
        self.register_buffer("running_var", torch.ones(teacher_dim))
        self.register_buffer("tracked", torch.zeros((), dtype=torch.long))

    def _standardise(self, target: Tensor, weight: Tensor) -> Tensor:
        n = weight.sum().clamp_min(1.0)
        mean = (target * weight[:, None]).sum(dim=0) / n
        var = ((target - mean).pow(2) * weight[:, None]).sum(dim=0) / n
        if self.norm == "running":
            if self.training and weight.sum() > 0:
                with torch.no_grad():
                    if int(self.tracked) == 0:
                        self.running_mean.copy_(mean)
                        self.running_var.copy_(var)
                    else:
                        self.running_mean.lerp_(mean, self.momentum)
                        self.running_var.lerp_(var, self.momentum)
                    self.tracked += 1
            mean, var = self.running_mean, self.running_var
        return (target - mean) / (var + 1e-5).sqrt()

    def forward(self, student_emb: Tensor, teacher_emb: Tensor, mask: Tensor | None = None) -> Tensor:
        projected = self.projection(student_emb.float())
        target = teacher_emb.detach().float()
        if self.norm != "none":
            weight = torch.ones(len(target), device=target.device) if mask is None else mask.float().reshape(-1)
            target = self._standardise(target, weight)
            if self.kind == "cosine":
                center = (projected * weight[:, None]).sum(dim=0) / weight.sum().clamp_min(1.0)
                projected = projected - center
        if self.kind == "cosine" and self.norm != "none":
            # a centred constant output is round-off noise: its norm is clamped so it scores cos = 0, not noise
            norms = projected.norm(dim=1).clamp_min(1e-3) * target.norm(dim=1).clamp_min(1e-3)
            per_row = 1.0 - (projected * target).sum(dim=1) / norms
        elif self.kind == "cosine":
            per_row = 1.0 - F.cosine_similarity(projected, target, dim=1, eps=1e-8)
        else:
            per_row = (projected - target).pow(2).mean(dim=1)
        return _masked_mean(per_row, mask)


class DistillationLoss(nn.Module):
    """supervised_weight * (focal|ce) + kd_weight * T^2 KL + feature_weight * alignment -> (total, parts).

    Built from a stage's `distill` section (temperature, kd_weight, supervised_weight, feature_weight,
    feature_loss, feature_norm, gate; absent keys: feature_norm none, gate none). The feature projection lives here, so the task's trainable module must hold this
    loss. `parts` holds the detached unweighted terms: sup, kd, feat (kd/feat only when active).
    """

    def __init__(self, supervised: nn.Module, distill_cfg: DistillConfig, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.supervised = supervised
        self.temperature = distill_cfg.temperature
        self.kd_weight = distill_cfg.kd_weight
        self.supervised_weight = distill_cfg.supervised_weight
        self.feature_weight = distill_cfg.feature_weight
        self.gate = distill_cfg.gate
        self.uses_teacher = distill_cfg.uses_teacher  # if not, the task skips the teacher's forward
        self.alignment = (
            FeatureAlignment(student_dim, teacher_dim, distill_cfg.feature_loss, distill_cfg.feature_norm)
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
            gate = teacher_gate(teacher_logits, labels, self.gate)
            kd = kd_kl_loss(student_logits, teacher_logits, self.temperature, mask, gate)
            total = total + self.kd_weight * kd
            parts["kd"] = kd.detach()
            if gate is not None:
                parts["gate"] = _masked_mean(gate, mask).detach()  # mean gate weight: the teacher's useful share
        if self.alignment is not None and teacher_emb is not None:
            feat = self.alignment(student_emb, teacher_emb, mask)
            total = total + self.feature_weight * feat
            parts["feat"] = feat.detach()
        return total, parts
