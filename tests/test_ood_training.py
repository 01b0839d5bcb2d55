"""Training-side OOD options of distill_sar: LogitNorm and outlier exposure with virtual anomalies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.config import DistillConfig, LossConfig, OutlierExposureConfig, validate_config
from pipeline.errors import UserError
from pipeline.losses import (
    DistillationLoss, LogitNormLoss, OutlierExposure, build_classification_loss, forward_with_outliers, uniform_kl,
)
from pipeline.models import create_model
from pipeline.tasks import ClassifierTask, DistillTask


def test_logit_norm_is_cross_entropy_on_normalised_logits_by_hand() -> None:
    logits = torch.tensor([[3.0, 4.0, 0.0], [1.0, -1.0, 2.0]])
    target = torch.tensor([1, 0])
    tau = 0.5
    loss = build_classification_loss(LossConfig(kind="ce", logit_norm=tau), np.array([5, 5, 5]))
    assert isinstance(loss, LogitNormLoss)
    expected = 0.0
    for row, t in zip(logits.tolist(), target.tolist()):  # by hand: z = l / (tau ||l||), CE = logsumexp(z) - z_t
        norm = math.sqrt(sum(v * v for v in row))
        z = [v / (tau * norm) for v in row]
        expected += math.log(sum(math.exp(v) for v in z)) - z[t]
    assert float(loss(logits, target)) == pytest.approx(expected / 2, rel=1e-6)
    # scaling the logits changes nothing (plain CE would fall as the norm grows)
    assert float(loss(10 * logits, target)) == pytest.approx(expected / 2, rel=1e-5)
    plain = build_classification_loss(LossConfig(kind="ce"), np.array([5, 5, 5]))
    assert not isinstance(plain, LogitNormLoss)
    with pytest.raises(UserError, match="logit_norm"):
        validate_config({"distill_sar": {"loss": {"logit_norm": 0.0}}})


def test_outlier_exposure_term_is_zero_at_uniform_and_positive_otherwise() -> None:
    assert float(uniform_kl(torch.zeros(4, 5))) == pytest.approx(0.0, abs=1e-7)
    assert float(uniform_kl(torch.full((2, 3), 7.0))) == pytest.approx(0.0, abs=1e-6)  # constant rows are uniform
    peaked = torch.tensor([[4.0, 0.0, 0.0]])
    p = torch.softmax(peaked, 1)[0]
    assert float(uniform_kl(peaked)) == pytest.approx(float((1 / 3 * torch.log((1 / 3) / p)).sum()), rel=1e-5)
    exposure = OutlierExposure(weight=0.5, per_batch=0.5, seed=0)
    assert float(exposure.loss(peaked)) == pytest.approx(0.5 * float(uniform_kl(peaked)), rel=1e-6)
    assert OutlierExposure.from_config(OutlierExposureConfig()) is None  # weight 0: off
    with pytest.raises(UserError, match="outlier_exposure.kinds"):
        validate_config({"distill_sar": {"outlier_exposure": {"weight": 1.0, "kinds": ["elastic"]}}})


def test_forward_with_outliers_appends_anomalies_and_splits_them_off() -> None:
    images, labels = torch.randn(6, 1, 12, 12), torch.tensor([0, 1, 2, 0, 1, 2])
    seen = []

    def forward(x):
        seen.append(len(x))
        return x.flatten(1)[:, :3] * 5

    out, oe = forward_with_outliers(forward, images, labels, OutlierExposure(weight=1.0, per_batch=0.5, seed=1))
    assert seen == [9] and out.shape == (6, 3) and float(oe) > 0  # 6 chips + 3 anomalies in one forward
    torch.testing.assert_close(out, images.flatten(1)[:, :3] * 5)
    out, oe = forward_with_outliers(forward, images, labels, None)
    assert oe is None and seen[-1] == 6


def _batch(n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sar = torch.randn(n, 1, 16, 16, generator=g)
    return {"image": sar, "sar": sar, "eo": sar.flip(-1), "has_eo": torch.ones(n, dtype=torch.bool),
            "label": torch.arange(n) % 3}


def _step(task, params) -> dict[str, float]:
    optimizer = torch.optim.SGD(list(params), lr=0.01)
    task.train_mode()
    loss, parts = task.loss(_batch())
    loss.backward()
    optimizer.step()
    assert math.isfinite(float(loss.detach()))
    return parts


@pytest.mark.parametrize("option", ["logit_norm", "outlier_exposure"])
def test_a_training_step_runs_with_each_option(option: str) -> None:
    torch.manual_seed(0)
    loss_cfg = LossConfig(kind="ce", logit_norm=0.1 if option == "logit_norm" else None)
    supervised = build_classification_loss(loss_cfg, np.array([3, 3, 3]))
    exposure = OutlierExposure(weight=0.5, seed=0) if option == "outlier_exposure" else None
    model = create_model("test_resnet", 3, small_input=False, drop_rate=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    parts = _step(ClassifierTask(model, supervised, outlier_exposure=exposure), model.parameters())
    assert ("oe" in parts) == (exposure is not None)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    student, teacher = (create_model("test_resnet", 3, small_input=False, drop_rate=0.0) for _ in range(2))
    criterion = DistillationLoss(supervised, DistillConfig(kd_weight=0.5), student.embed_dim, teacher.embed_dim)
    task = DistillTask(student, teacher, criterion, outlier_exposure=exposure)
    parts = _step(task, [q for q in task.module.parameters() if q.requires_grad])
    assert ("oe" in parts) == (exposure is not None) and "kd" in parts
