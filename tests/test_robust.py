"""Attacks, adversarial training losses, improved cross-entropy, layer freezing, stages.robustness."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from pipeline.config import LossConfig, validate_config
from pipeline.errors import UserError
from pipeline.losses import ImprovedCrossEntropy, build_classification_loss
from pipeline.models import create_model, freeze_early_layers
from pipeline.robust.attacks import UnitRangeModel, fgsm, pgd, pgd_step_size, to_unit_range
from pipeline.robust.evaluate import RobustnessSettings
from pipeline.robust.training import (
    AdversarialSettings, AdversarialTask, feature_gradient_penalty, gradient_alignment, with_adversarial,
)
from pipeline.tasks import ClassifierTask, HeadTask


# ----------------------------------------------------------------------------------------- attacks


def _hand_linear() -> nn.Module:
    """logits = W x with W = [[1, -1], [0, 0]] on 2-pixel chips (1, 1, 2)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 0.0]]))
    return model


def test_fgsm_hand_computed_case_and_clipping() -> None:
    # x = (0.5, 0.5): logits (0, 0), p = (1/2, 1/2); label 0: dCE/dx = W^T (p - e0) = (-1/2, +1/2)
    model = _hand_linear()
    x = torch.tensor([[[[0.5, 0.5]]]])
    adv = fgsm(model, x, torch.tensor([0]), eps=4 / 255)
    assert torch.allclose(adv, torch.tensor([[[[0.5 - 4 / 255, 0.5 + 4 / 255]]]]))
    # the same gradient signs at x = (0.01, 0.99): both pixels are clipped to [0, 1]
    edge = torch.tensor([[[[0.01, 0.99]]]])
    assert torch.allclose(fgsm(model, edge, torch.tensor([0]), eps=8 / 255), torch.tensor([[[[0.0, 1.0]]]]))


def test_fgsm_moves_every_pixel_by_eps_in_the_gradient_sign() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    x = torch.rand(5, 1, 8, 8) * 0.8 + 0.1  # away from the [0, 1] bounds: nothing clips at eps 4/255
    labels = torch.tensor([0, 1, 2, 0, 1])
    xg = x.clone().requires_grad_(True)
    F.cross_entropy(model(xg), labels, reduction="sum").backward()
    assert (xg.grad != 0).all()
    adv = fgsm(model, x, labels, eps=4 / 255)
    assert torch.allclose(adv - x, 4 / 255 * xg.grad.sign(), atol=1e-6)


def test_pgd_never_leaves_the_eps_ball_nor_the_unit_range() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x = torch.rand(6, 1, 6, 6)
    x[0] = 0.0
    x[1] = 1.0
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    eps = 8 / 255
    adv = pgd(model, x, labels, eps, steps=7, step_size=3 * eps, random_start=True)
    assert ((adv - x).abs() <= eps + 1e-6).all()
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    assert (adv != x).any()


def test_pgd_step_size_rule() -> None:
    assert pgd_step_size(8 / 255, 10, "auto") == pytest.approx(2.5 * 8 / 255 / 10)
    assert pgd_step_size(8 / 255, 10, 0.25) == pytest.approx(2 / 255)
    with pytest.raises(UserError, match="step_size"):
        pgd_step_size(8 / 255, 10, "big")
    with pytest.raises(UserError, match="epsilon"):
        fgsm(_hand_linear(), torch.zeros(1, 1, 1, 2), torch.tensor([0]), eps=2.0)


def _toy_problem(n: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    """4x4 chips in [0, 1]: class 1 when two corner pixels differ by more than 0.3 (a non-linear rule)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 4, 4, generator=g)
    labels = ((x[:, 0, 0, 0] - x[:, 0, 3, 3]).abs() > 0.3).long()
    return x, labels


def test_pgd_lowers_accuracy_of_a_trained_model_more_than_fgsm() -> None:
    torch.manual_seed(0)
    x, labels = _toy_problem()
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        opt.step()
    model.eval()

    def accuracy(inputs: torch.Tensor) -> float:
        with torch.no_grad():
            return float((model(inputs).argmax(1) == labels).float().mean())

    clean = accuracy(x)
    eps = 24 / 255
    after_fgsm = accuracy(fgsm(model, x, labels, eps))
    after_pgd = accuracy(pgd(model, x, labels, eps, steps=20, step_size=pgd_step_size(eps, 20, "auto")))
    assert clean > 0.95
    assert after_fgsm < clean - 0.2
    assert after_pgd < after_fgsm - 0.01  # 0.31 vs 0.34 when written


def test_unit_range_model_applies_the_dataset_normalisation() -> None:
    inner = nn.Identity()
    wrapped = UnitRangeModel(inner, (0.2, 0.5))
    x01 = torch.tensor([0.2, 0.7])
    assert torch.allclose(wrapped(x01), torch.tensor([0.0, 1.0]))
    assert torch.allclose(to_unit_range(torch.tensor([0.0, 1.0, 9.0]), (0.2, 0.5)), torch.tensor([0.2, 0.7, 1.0]))


# ------------------------------------------------------------------------- adversarial training terms


def test_euc_at_term_is_zero_when_gradients_coincide_and_positive_otherwise() -> None:
    torch.manual_seed(0)
    # logits (w.x, 0): the input gradient of CE for label 0 is (p0 - 1) w, always along -w
    linear = nn.Sequential(nn.Flatten(), nn.Linear(9, 1, bias=False))
    two_logits = lambda z: torch.cat([linear(z), torch.zeros(len(z), 1)], dim=1)  # noqa: E731
    x = torch.rand(4, 1, 3, 3)
    x_adv = (x + 0.03 * torch.randn_like(x)).clamp(0, 1)
    labels = torch.zeros(4, dtype=torch.long)
    assert gradient_alignment(two_logits, x, x_adv, labels).item() == pytest.approx(0.0, abs=1e-6)

    net = nn.Sequential(nn.Flatten(), nn.Linear(9, 16), nn.Tanh(), nn.Linear(16, 3))
    labels3 = torch.tensor([0, 1, 2, 0])
    assert gradient_alignment(net, x, x, labels3).item() == pytest.approx(0.0, abs=1e-6)
    term = gradient_alignment(net, x, (x + 0.5 * torch.randn_like(x)).clamp(0, 1), labels3)
    assert term.item() > 1e-3
    term.backward()  # double backpropagation reaches the weights
    assert net[1].weight.grad is not None and net[1].weight.grad.abs().sum() > 0


def test_lipschitz_penalty_matches_the_hand_formula() -> None:
    torch.manual_seed(0)
    a = torch.randn(3, 4)
    embed = lambda z: z.flatten(1) @ a.T  # noqa: E731  f = A x
    x = torch.rand(5, 1, 2, 2)
    f = x.flatten(1) @ a.T
    expected = (2 * (f - f.mean(0)) @ a).abs().sum(1).mean()  # grad_x_i ||f_i - f_bar||^2 = 2 A^T (f_i - f_bar)
    assert feature_gradient_penalty(embed, x).item() == pytest.approx(expected.item(), rel=1e-5)


def test_adversarial_settings_check_every_key() -> None:
    s = AdversarialSettings.from_config({"kind": "pgd", "eps": 4, "steps": 5, "fraction": 0.5, "lambda": 0.8})
    assert s.eps == pytest.approx(4 / 255) and s.step() == pytest.approx(2.5 * 4 / 255 / 5)
    assert AdversarialSettings.from_config({"kind": "fgsm", "eps": 8}).step() == pytest.approx(1.25 * 8 / 255)
    assert not AdversarialSettings.from_config(None).active
    bad = [  # checked once, at load, by the schema, with the dotted key
        ({"kind": "trades"}, "adversarial.kind"), ({"kind": "pgd", "eps": 0}, "adversarial.eps"),
        ({"kind": "pgd", "eps": 300}, "adversarial.eps"), ({"kind": "pgd", "steps": 0}, "adversarial.steps"),
        ({"kind": "pgd", "fraction": 0}, "adversarial.fraction"), ({"kind": "pgd", "fraction": 1.5}, "adversarial.fraction"),
        ({"kind": "euc_at", "lambda": -1}, "adversarial.lambda"), ({"kind": "pgd", "step_size": "huge"}, "adversarial.step_size"),
        ({"kind": "pgd", "epsilon": 8}, "adversarial.epsilon"), ({"kind": "pgd", "eps": "x"}, "adversarial.eps"),
    ]
    for section, message in bad:
        with pytest.raises(UserError, match=f"distill_sar.{message}"):
            validate_config({"distill_sar": {"adversarial": section}})


def test_ramp_grows_eps_and_lambda_linearly_then_holds() -> None:
    s = AdversarialSettings.from_config({"kind": "euc_at", "eps": 4, "lambda": 0.8, "ramp_epochs": 4})
    assert [round(s.at_epoch(e).eps * 255, 6) for e in range(6)] == [1.0, 2.0, 3.0, 4.0, 4.0, 4.0]
    assert [round(s.at_epoch(e).weight, 6) for e in range(5)] == [0.2, 0.4, 0.6, 0.8, 0.8]
    assert s.at_epoch(0).step() == pytest.approx(s.step() / 4)  # the step follows eps
    assert AdversarialSettings.from_config({"kind": "pgd", "eps": 4}).at_epoch(0).eps == pytest.approx(4 / 255)
    assert "ramped up over 4 epochs" in s.describe()
    with pytest.raises(UserError, match="distill_sar.adversarial.ramp_epochs"):
        validate_config({"distill_sar": {"adversarial": {"kind": "pgd", "ramp_epochs": -1}}})


def test_adversarial_task_attacks_with_the_ramped_eps_of_its_epoch() -> None:
    torch.manual_seed(0)
    norm = (0.4, 0.2)
    x01 = torch.rand(8, 1, 16, 16) * 0.8 + 0.1
    batch = {"image": (x01 - norm[0]) / norm[1], "label": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])}
    inner = _Spy(create_model("aconvnet", num_classes=3, intensity="standardize"), nn.CrossEntropyLoss())
    task = with_adversarial(inner, AdversarialSettings.from_config({"kind": "pgd", "eps": 8, "steps": 2, "ramp_epochs": 4}), norm)
    for epoch, eps in ((0, 2 / 255), (5, 8 / 255)):
        task.start_epoch(epoch)
        task.loss(batch, task.module)
        moved = (inner.seen * norm[1] + norm[0] - x01).abs().max().item()
        assert eps / 2 < moved <= eps + 1e-5


class _Spy(ClassifierTask):
    """A ClassifierTask that remembers the chips its loss saw."""

    def loss(self, batch, module=None):
        self.seen = batch["image"].detach().clone()
        return super().loss(batch, module)


@pytest.mark.parametrize("kind", ["fgsm", "pgd", "euc_at", "lipschitz"])
def test_every_kind_trains_a_step_within_the_eps_ball(kind: str) -> None:
    torch.manual_seed(0)
    model = create_model("aconvnet", num_classes=3, intensity="standardize")
    norm = (0.4, 0.2)
    x01 = torch.rand(8, 1, 16, 16) * 0.8 + 0.1
    batch = {"image": (x01 - norm[0]) / norm[1], "label": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])}
    inner = _Spy(model, nn.CrossEntropyLoss())
    settings = AdversarialSettings.from_config({"kind": kind, "eps": 8, "steps": 2, "fraction": 0.5, "lambda": 0.8})
    task = with_adversarial(inner, settings, norm)
    assert isinstance(task, AdversarialTask)
    task.train_mode()
    loss, parts = task.loss(batch, task.module)
    assert math.isfinite(loss.item()) and all(v.ndim == 0 for v in parts.values())  # parts stay device tensors
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    moved = (inner.seen * norm[1] + norm[0] - x01).abs()
    if kind == "lipschitz":
        assert "lipschitz" in parts and moved.max() < 1e-6
    else:
        assert moved[:4].max() <= 8 / 255 + 1e-5 and moved[:4].max() > 1 / 255  # half the batch attacked
        assert moved[4:].max() < 1e-6
    if kind == "euc_at":
        assert parts["euc"] >= 0


@pytest.mark.parametrize("kind", ["fgsm", "pgd", "euc_at", "lipschitz"])
def test_a_blank_chip_keeps_every_kind_finite(kind: str) -> None:
    """A constant chip (the real 2022 data and the replica hold blank ones) under per-chip standardisation:
    EUC_AT and the Lipschitz penalty differentiate through the clean chip, whose std has a 0/0 gradient."""
    torch.manual_seed(0)
    model = create_model("aconvnet", num_classes=3, intensity="standardize")
    norm = (0.4, 0.2)
    x01 = torch.rand(8, 1, 16, 16) * 0.8 + 0.1
    x01[0] = 0.0  # blank, in the attacked (penalised) half
    batch = {"image": (x01 - norm[0]) / norm[1], "label": torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])}
    settings = AdversarialSettings.from_config({"kind": kind, "eps": 8, "steps": 2, "fraction": 0.5, "lambda": 0.8})
    task = with_adversarial(ClassifierTask(model, nn.CrossEntropyLoss()), settings, norm)
    task.train_mode()
    loss, _ = task.loss(batch, task.module)
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_adversarial_none_is_the_task_itself_and_embeddings_are_refused() -> None:
    model = create_model("aconvnet", num_classes=3)
    task = ClassifierTask(model, nn.CrossEntropyLoss())
    assert with_adversarial(task, AdversarialSettings(), (0.5, 0.25)) is task
    with pytest.raises(UserError, match="embeddings"):
        with_adversarial(HeadTask(model, nn.CrossEntropyLoss()), AdversarialSettings(kind="pgd"), (0.5, 0.25))


# --------------------------------------------------------------------------------- improved CE


def test_ice_is_ce_on_a_right_prediction_and_ce_plus_the_gap_on_a_wrong_one() -> None:
    loss = build_classification_loss(LossConfig(kind="ice"), np.array([5, 5, 5]))
    assert isinstance(loss, ImprovedCrossEntropy)
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    probs = logits.softmax(1)
    right = loss(logits[:1], torch.tensor([0]))
    assert right.item() == pytest.approx(F.cross_entropy(logits[:1], torch.tensor([0])).item(), rel=1e-6)
    wrong = loss(logits[1:], torch.tensor([0]))
    gap = (probs[1].max() - probs[1, 0]).item()
    assert gap > 0.5
    assert wrong.item() == pytest.approx(F.cross_entropy(logits[1:], torch.tensor([0])).item() + gap, rel=1e-6)
    with pytest.raises(UserError, match="distill_sar.loss.kind.*'focal', 'ce' or 'ice'"):
        validate_config({"distill_sar": {"loss": {"kind": "hinge"}}})


# ------------------------------------------------------------------------------------- transfer


def test_freeze_early_layers_keeps_transferred_weights_and_statistics(tmp_path) -> None:
    rgb = timm.create_model("resnet10t", pretrained=False, in_chans=3, num_classes=1000).state_dict()
    path = tmp_path / "timm_resnet10t.safetensors"
    save_file(rgb, str(path))
    model = create_model("resnet10t", num_classes=4, init_weights=path)
    frozen = freeze_early_layers(model, 1)
    assert frozen == ["backbone.conv1.0.weight", "backbone.conv1.1.weight", "backbone.conv1.1.bias"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    F.cross_entropy(model(torch.rand(4, 1, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    after = model.state_dict()
    assert torch.equal(after["backbone.conv1.0.weight"], rgb["conv1.0.weight"].sum(dim=1, keepdim=True))
    assert torch.equal(after["backbone.conv1.1.running_mean"], before["backbone.conv1.1.running_mean"])
    assert not torch.equal(after["backbone.conv1.3.weight"], before["backbone.conv1.3.weight"])  # 2nd conv trains
    assert not torch.equal(after["backbone.conv1.4.running_mean"], before["backbone.conv1.4.running_mean"])
    with pytest.raises(UserError, match="only"):
        freeze_early_layers(model, 10_000)


# ----------------------------------------------------------------------------- settings, stage


def test_robustness_settings() -> None:
    s = RobustnessSettings.from_config({"enabled": True, "eps": [8, 2], "pgd_steps": [10], "max_chips": 5})
    assert s.eps == pytest.approx((2 / 255, 8 / 255)) and s.attacks() == [("fgsm", 1), ("pgd", 10)]
    for section, message in [({"eps": []}, "robustness.eps"), ({"eps": [0]}, "robustness.eps"),
                             ({"pgd_steps": [0]}, "robustness.pgd_steps"), ({"max_chips": 0}, "robustness.max_chips"),
                             ({"batch": 3}, "robustness.batch"), ({"step_size": -1}, "robustness.step_size")]:
        with pytest.raises(UserError, match=message):
            validate_config({"robustness": section})
