"""Focal/CE with per-class alpha, knowledge distillation, feature alignment."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import DistillConfig, LossConfig, validate_config
from pipeline.errors import UserError
from pipeline.losses import (
    DistillationLoss,
    FeatureAlignment,
    FocalLoss,
    build_classification_loss,
    class_alpha,
    kd_kl_loss,
    teacher_gate,
)


def _batch(n: int = 12, c: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 3, torch.randint(0, c, (n,), generator=g)


def _loss_and_grad(fn, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.clone().requires_grad_(True)
    loss = fn(x, target)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_focal_at_gamma_zero_is_cross_entropy(smoothing: float) -> None:
    logits, target = _batch()
    focal = FocalLoss(gamma=0.0, label_smoothing=smoothing)
    got, got_grad = _loss_and_grad(focal, logits, target)
    ref, ref_grad = _loss_and_grad(lambda x, t: F.cross_entropy(x, t, label_smoothing=smoothing), logits, target)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grad, ref_grad, rtol=1e-6, atol=1e-8)


def test_alpha_scales_each_sample_gradient_by_its_class_alpha() -> None:
    logits, target = _batch(c=4)
    alpha = torch.tensor([0.5, 2.0, 1.0, 0.25])
    _, grad = _loss_and_grad(FocalLoss(gamma=0.0, alpha=alpha), logits, target)
    _, plain = _loss_and_grad(FocalLoss(gamma=0.0), logits, target)
    torch.testing.assert_close(grad, plain * alpha[target][:, None])


def test_focal_downweights_easy_examples() -> None:
    # row 0 is easy (p_true ~ 0.9), row 1 is hard (p_true ~ 0.1)
    logits = torch.tensor([[np.log(9.0), 0.0], [0.0, np.log(9.0)]], dtype=torch.float32)
    target = torch.tensor([0, 0])
    ce = FocalLoss(gamma=0.0).per_sample(logits, target)
    focal = FocalLoss(gamma=2.0).per_sample(logits, target)
    ratio = focal / ce
    torch.testing.assert_close(ratio, torch.tensor([0.1**2, 0.9**2]), rtol=1e-5, atol=1e-6)


def test_focal_label_smoothing_uses_smoothed_targets_in_log_term() -> None:
    logits, target = _batch(n=6, c=3)
    got = FocalLoss(gamma=2.0, label_smoothing=0.2).per_sample(logits, target)
    log_p = F.log_softmax(logits, dim=1)
    q = torch.full_like(log_p, 0.2 / 3).scatter_(1, target[:, None], 0.8 + 0.2 / 3)
    p_true = log_p.exp().gather(1, target[:, None]).squeeze(1)
    torch.testing.assert_close(got, (1 - p_true) ** 2 * -(q * log_p).sum(dim=1))


def test_class_alpha_kinds() -> None:
    counts = np.array([100, 10, 0, 1])
    assert class_alpha("none", counts) is None and class_alpha(None, counts) is None

    inv = class_alpha("inverse_freq", counts)
    assert inv[2] == 0
    torch.testing.assert_close(inv[[0, 1, 3]].mean(), torch.tensor(1.0))
    torch.testing.assert_close(inv[1] / inv[0], torch.tensor(10.0))

    beta = 0.99
    eff = class_alpha("effective_number", counts, beta=beta)
    raw = np.array([(1 - beta) / (1 - beta**n) for n in (100, 10, 1)])
    torch.testing.assert_close(eff[[0, 1, 3]], torch.tensor(raw / raw.mean(), dtype=torch.float32))
    assert eff[2] == 0
    torch.testing.assert_close(class_alpha("effective_number", counts, beta=0.0), torch.tensor([1.0, 1.0, 0.0, 1.0]))

    listed = class_alpha([1.0, 3.0, 5.0, 2.0], counts)
    torch.testing.assert_close(listed, torch.tensor([0.5, 1.5, 0.0, 1.0]))


@pytest.mark.parametrize(
    "kind, counts, message",
    [
        ("sqrt", [1, 2], "unknown"),
        ([1.0, 2.0, 3.0], [1, 2], "3 values, expected one per class"),
        ([1.0, -1.0], [1, 2], ">= 0"),
        ("inverse_freq", [0, 0], "all zero"),
    ],
)
def test_class_alpha_rejects_bad_input(kind, counts, message) -> None:
    with pytest.raises(UserError, match=message):
        class_alpha(kind, np.array(counts))


def test_build_classification_loss() -> None:
    """The built loss's value against a hand computation from the config's numbers."""
    counts = np.array([50, 5, 1])
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.2, 0.3], [-0.5, 0.0, 2.5], [1.0, 1.0, 1.0]])
    target = torch.tensor([0, 1, 2, 0])
    p = F.softmax(logits, dim=1)
    p_true = p[torch.arange(4), target]

    # focal, gamma 1.5, alpha inverse_freq: alpha_c = (1/n_c) / mean(1/n) over present classes
    inv = np.array([1 / 50, 1 / 5, 1 / 1])
    alpha = torch.tensor(inv / inv.mean(), dtype=torch.float32)
    expected = (alpha[target] * (1 - p_true) ** 1.5 * -p_true.log()).mean()
    focal = build_classification_loss(LossConfig.model_validate({"kind": "focal", "gamma": 1.5, "alpha": "inverse_freq"}), counts)
    torch.testing.assert_close(focal(logits, target), expected)

    # focal with defaults (gamma 2, no alpha) and label smoothing 0.3: q = 0.7 one-hot + 0.3 / 3
    q = torch.full((4, 3), 0.1).scatter_(1, target[:, None], 0.8)
    expected = ((1 - p_true) ** 2 * -(q * p.log()).sum(dim=1)).mean()
    smoothed = build_classification_loss(LossConfig.model_validate({"kind": "focal", "alpha": "none", "label_smoothing": 0.3}), counts)
    torch.testing.assert_close(smoothed(logits, target), expected)

    # ce ignores gamma; label smoothing 0.1 is torch's label-smoothed cross-entropy
    ce = build_classification_loss(LossConfig.model_validate({"kind": "ce", "gamma": 2.0, "alpha": "none", "label_smoothing": 0.1}), counts)
    q = torch.full((4, 3), 0.1 / 3).scatter_(1, target[:, None], 0.9 + 0.1 / 3)
    torch.testing.assert_close(ce(logits, target), -(q * p.log()).sum(dim=1).mean())
    torch.testing.assert_close(ce(logits, target), F.cross_entropy(logits, target, label_smoothing=0.1))

    # ce with explicit alpha: per-sample weights alpha_y (normalised to mean 1 over present classes)
    weighted = build_classification_loss(LossConfig.model_validate({"kind": "ce", "alpha": [1.0, 2.0, 3.0]}), counts)
    alpha = torch.tensor([0.5, 1.0, 1.5])
    torch.testing.assert_close(weighted(logits, target), (alpha[target] * -p_true.log()).mean())

    with pytest.raises(UserError, match="pretrain_eo.loss.kind"):
        validate_config({"pretrain_eo": {"loss": {"kind": "bce"}}})


def test_kd_zero_for_equal_logits_positive_otherwise_and_masked() -> None:
    student, _ = _batch(n=6, c=4, seed=1)
    teacher, _ = _batch(n=6, c=4, seed=2)
    assert kd_kl_loss(student, student.clone(), 4.0).abs() < 1e-6
    full = kd_kl_loss(student, teacher, 4.0)
    assert full > 0
    t = 4.0
    manual = F.kl_div(F.log_softmax(student / t, 1), F.softmax(teacher / t, 1), reduction="batchmean") * t * t
    torch.testing.assert_close(full, manual)

    mask = torch.tensor([True, False, True, False, False, False])
    torch.testing.assert_close(kd_kl_loss(student, teacher, t, mask), kd_kl_loss(student[mask], teacher[mask], t))

    s = student.clone().requires_grad_(True)
    none = kd_kl_loss(s, teacher, t, torch.zeros(6, dtype=torch.bool))
    none.backward()
    assert none == 0 and torch.equal(s.grad, torch.zeros_like(s))


def test_kd_does_not_backpropagate_into_the_teacher() -> None:
    student, _ = _batch(n=4, c=3, seed=1)
    teacher = _batch(n=4, c=3, seed=2)[0].requires_grad_(True)
    kd_kl_loss(student.requires_grad_(True), teacher, 2.0).backward()
    assert teacher.grad is None


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_feature_alignment(kind: str) -> None:
    align = FeatureAlignment(3, 3, kind)
    with torch.no_grad():
        align.projection.weight.copy_(torch.eye(3))
        align.projection.bias.zero_()
    feats = torch.randn(5, 3)
    assert align(feats, feats.clone()) < 1e-6
    other = -feats
    expected = 2.0 if kind == "cosine" else (4 * feats.pow(2)).mean(dim=1).mean().item()
    assert align(feats, other).item() == pytest.approx(expected, rel=1e-5)
    mask = torch.tensor([True, False, False, False, False])
    torch.testing.assert_close(align(feats, other, mask), align(feats[:1], other[:1]))
    teacher = other.clone().requires_grad_(True)
    align(feats, teacher).backward()
    assert teacher.grad is None and align.projection.weight.grad is not None
    with pytest.raises(UserError, match="feature_loss 'l1'"):
        FeatureAlignment(3, 3, "l1")


def test_distillation_loss_combines_weighted_terms() -> None:
    cfg = {"temperature": 2.0, "kd_weight": 0.7, "supervised_weight": 1.3, "feature_weight": 0.5, "feature_loss": "cosine",
           "gate": "none", "feature_norm": "none"}
    supervised = FocalLoss(gamma=0.0)
    loss = DistillationLoss(supervised, DistillConfig.model_validate(cfg), student_dim=4, teacher_dim=6)
    s_logits, labels = _batch(n=5, c=3, seed=3)
    t_logits, _ = _batch(n=5, c=3, seed=4)
    s_emb, t_emb = torch.randn(5, 4), torch.randn(5, 6)
    mask = torch.tensor([True, True, False, True, False])
    total, parts = loss(s_logits, s_emb, t_logits, t_emb, labels, mask)
    assert set(parts) == {"sup", "kd", "feat"}
    torch.testing.assert_close(parts["sup"], supervised(s_logits, labels))
    torch.testing.assert_close(parts["kd"], kd_kl_loss(s_logits, t_logits, 2.0, mask))
    torch.testing.assert_close(parts["feat"], loss.alignment(s_emb, t_emb, mask))
    torch.testing.assert_close(total, 1.3 * parts["sup"] + 0.7 * parts["kd"] + 0.5 * parts["feat"])


def test_distillation_without_feature_term_or_teacher() -> None:
    loss = DistillationLoss(FocalLoss(gamma=0.0), DistillConfig.model_validate({"temperature": 4.0, "kd_weight": 1.0, "feature_weight": 0.0}), 4, 6)
    assert loss.alignment is None
    s_logits, labels = _batch(n=3, c=3)
    total, parts = loss(s_logits, torch.randn(3, 4), None, None, labels)
    assert set(parts) == {"sup"}
    torch.testing.assert_close(total, parts["sup"])
    with pytest.raises(UserError, match="distill_sar.distill.temperature"):
        validate_config({"distill_sar": {"distill": {"temperature": 0.0}}})
def test_teacher_gate_math() -> None:
    teacher = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([0, 0, 2])
    assert teacher_gate(teacher, labels, "none") is None
    # argmax [0, 1, 0 (tie -> first)]: right, wrong, wrong
    torch.testing.assert_close(teacher_gate(teacher, labels, "correct"), torch.tensor([1.0, 0.0, 0.0]))
    expected = F.softmax(teacher, dim=1)[torch.arange(3), labels]
    torch.testing.assert_close(teacher_gate(teacher, labels, "confidence"), expected)
    assert expected[2].item() == pytest.approx(1 / 3)
    with pytest.raises(UserError, match="distill.gate 'sometimes'"):
        teacher_gate(teacher, labels, "sometimes")


def test_gated_kd_averages_over_masked_rows_not_over_the_gate() -> None:
    student, labels = _batch(n=6, c=4, seed=1)
    teacher, _ = _batch(n=6, c=4, seed=2)
    mask = torch.tensor([True, True, True, True, False, False])
    weight = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0])
    t = 2.0
    per_row = torch.stack([kd_kl_loss(student[i:i + 1], teacher[i:i + 1], t) for i in range(6)])
    expected = (per_row * weight * mask.float()).sum() / mask.sum()
    torch.testing.assert_close(kd_kl_loss(student, teacher, t, mask, weight), expected)
    # a closed gate: zero loss and zero gradient, parameters still touched
    s = student.clone().requires_grad_(True)
    kd_kl_loss(s, teacher, t, mask, torch.zeros(6)).backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_distillation_loss_gate_correct_ignores_rows_the_teacher_gets_wrong() -> None:
    cfg = {"temperature": 2.0, "kd_weight": 1.0, "feature_weight": 0.0, "gate": "correct"}
    loss = DistillationLoss(FocalLoss(gamma=0.0), DistillConfig.model_validate(cfg), 4, 6)
    s_logits, _ = _batch(n=4, c=3, seed=5)
    t_logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]])
    labels = torch.tensor([0, 0, 2, 1])  # teacher right on rows 0 and 2
    _, parts = loss(s_logits, torch.randn(4, 4), t_logits, None, labels)
    keep = torch.tensor([1.0, 0.0, 1.0, 0.0])
    torch.testing.assert_close(parts["kd"], kd_kl_loss(s_logits, t_logits, 2.0, None, keep))
    assert parts["gate"].item() == pytest.approx(0.5)
    # changing the wrong rows' teacher logits changes nothing
    t2 = t_logits.clone()
    t2[1], t2[3] = torch.tensor([0, 9.0, -3]), torch.tensor([-2.0, 0, 7])
    _, parts2 = loss(s_logits, torch.randn(4, 4), t2, None, labels)
    torch.testing.assert_close(parts2["kd"], parts["kd"])


@pytest.mark.parametrize("norm", ["batch", "running"])
def test_standardised_feature_alignment_has_no_bias_shortcut(norm: str) -> None:
    torch.manual_seed(0)
    # post-ReLU teacher features with a large shared positive mean
    teacher = torch.relu(torch.randn(64, 8)) + 3.0
    student = torch.randn(64, 5)
    raw = FeatureAlignment(5, 8, "cosine", "none")
    with torch.no_grad():  # constant student output: the projection's bias alone, along the teacher's mean
        raw.projection.weight.zero_()
        raw.projection.bias.copy_(teacher.mean(dim=0))
    assert raw(student, teacher).item() < 0.05  # the shortcut the raw target allows
    for kind in ("cosine", "mse"):
        align = FeatureAlignment(5, 8, kind, norm)
        align.train()
        with torch.no_grad():
            align.projection.weight.zero_()
            align.projection.bias.copy_(teacher.mean(dim=0))
        constant = align(student, teacher).item()
        assert constant >= 1.0 - 1e-3, (kind, constant)  # cosine: exactly 1; mse: 1 + |bias|^2 / D
        with torch.no_grad():
            align.projection.bias.zero_()
        assert align(student, teacher).item() == pytest.approx(1.0, abs=1e-3)
    # a student that reproduces the standardised features scores (nearly) 0
    z = (teacher - teacher.mean(0)) / (teacher.var(0, unbiased=False) + 1e-5).sqrt()
    for kind in ("cosine", "mse"):
        align = FeatureAlignment(8, 8, kind, norm)
        with torch.no_grad():
            align.projection.weight.copy_(torch.eye(8))
            align.projection.bias.zero_()
        assert align(z, teacher).item() < 1e-3


def test_feature_alignment_running_statistics_and_mask() -> None:
    align = FeatureAlignment(3, 3, "mse", "running", momentum=0.5)
    align.train()
    t1, t2 = torch.randn(10, 3) + 5.0, torch.randn(10, 3) - 5.0
    align(torch.randn(10, 3), t1)
    torch.testing.assert_close(align.running_mean, t1.mean(0))  # first batch: taken as is
    align(torch.randn(10, 3), t2)
    torch.testing.assert_close(align.running_mean, 0.5 * t1.mean(0) + 0.5 * t2.mean(0))
    align.eval()
    before = align.running_mean.clone()
    align(torch.randn(10, 3), t1)
    assert torch.equal(align.running_mean, before)  # evaluation does not update
    batch = FeatureAlignment(3, 3, "mse", "batch")
    mask = torch.tensor([True] * 5 + [False] * 5)
    feats, target = torch.randn(10, 3), torch.randn(10, 3)
    target[5:] += 100.0  # unmasked rows must not move the statistics
    torch.testing.assert_close(batch(feats, target, mask), batch(feats[:5], target[:5]))
    with pytest.raises(UserError, match="feature_norm 'l2'"):
        FeatureAlignment(3, 3, "mse", "l2")
