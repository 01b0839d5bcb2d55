"""Adversarial training as a wrapper around a training task's loss (the loop in pipeline.train is unchanged).

`distill_sar.adversarial` (read here, in `AdversarialSettings.from_config`) picks one of:
- `fgsm`: FGSM with a random start (Wong et al. 2020): delta ~ U(-eps, eps), one signed-gradient step
  (step_size auto = 1.25 eps), projected back to the eps-ball; the task's loss on the attacked chips.
- `pgd`: Madry-style training on PGD chips (random start, `steps` steps).
- `euc_at` (Xue et al., IEEE JSTARS 2025): the task's loss on the attacked chips (delta initialised from
  U(-eps, eps), then `steps` PGD steps) plus lambda * mean ||g^(x) - g^(x + delta)||_2, where g^ is the
  L2-normalised input gradient of the label-smoothed (0.1) cross-entropy. The paper's classification
  term is label-smoothed CE(0.1), distill_sar's default loss (`loss.kind: ce`, `loss.label_smoothing: 0.1`).
- `lipschitz` (Chan-Hon-Tong et al.): the task's loss on clean chips plus lambda * mean_i
  ||grad_x ||f(x_i) - f_bar||^2||_1, f the pooled embedding, f_bar its batch mean (no attack).

`fraction` of each batch (its first rows; the sampler's order is random) is attacked or penalised.
Epsilons are in 1/255 units of the [0, 1] chip (see pipeline.robust.attacks); attacks are generated
with the model in the mode training left it in (train mode, as in Madry et al. and Wong et al.).
Under distillation the attacked input is the SAR chip and every term of the distillation loss
(labels, KD, feature alignment) is computed on it, while the frozen teacher sees the clean EO chip:
the student learns to give the teacher's answer on attacked chips (as in adversarially robust
distillation, Goldblum et al. 2020). The attacks maximise the cross-entropy on the labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline import distributed
from pipeline.errors import UserError
from pipeline.models import ChipClassifier
from pipeline.robust.attacks import UnitRangeModel, fgsm, from_unit_range, pgd, pgd_step_size, to_unit_range
from pipeline.tasks import ClassifierTask, DistillTask

ADVERSARIAL_KINDS = ("none", "fgsm", "pgd", "euc_at", "lipschitz")
EUC_AT_SMOOTHING = 0.1  # label smoothing of the loss whose input gradients EUC_AT aligns
FGSM_RS_STEP = 1.25  # FGSM with random start: step size in units of eps (Wong et al. 2020)


@dataclass(frozen=True)
class AdversarialSettings:
    """A stage's `adversarial` section; `eps` in [0, 1] units (the config states it in 1/255 units)."""

    kind: str = "none"
    eps: float = 8 / 255
    steps: int = 1
    step_size: str | float = "auto"
    fraction: float = 1.0
    weight: float = 0.8  # config key `lambda`
    ramp_epochs: int = 0  # eps and lambda reach full strength after this many epochs

    @property
    def active(self) -> bool:
        return self.kind != "none"

    @classmethod
    def from_config(cls, section: dict[str, Any] | None) -> "AdversarialSettings":
        """Read and check `<stage>.adversarial`; a missing section means kind none."""
        section = dict(section or {})
        # unknown keys, types and ranges are the schema's (pipeline.config); this converts units
        kind = str(section.get("kind", "none"))
        if kind not in ADVERSARIAL_KINDS:
            raise UserError(f"adversarial.kind '{kind}' is unknown: use one of {', '.join(ADVERSARIAL_KINDS)}")
        try:
            eps255 = float(section.get("eps", 8))
            steps = int(section.get("steps", 1))
            fraction = float(section.get("fraction", 1.0))
            weight = float(section.get("lambda", 0.8))
            ramp_epochs = int(section.get("ramp_epochs", 0))
        except (TypeError, ValueError):
            raise UserError("adversarial: eps, steps, fraction and lambda must be numbers") from None
        if not 0.0 < eps255 <= 255.0:
            raise UserError(f"adversarial.eps is in 1/255 units and must be in (0, 255], got {eps255}")
        if steps < 1:
            raise UserError(f"adversarial.steps must be at least 1, got {steps}")
        if not 0.0 < fraction <= 1.0:
            raise UserError(f"adversarial.fraction (share of each batch attacked) must be in (0, 1], got {fraction}")
        if not (weight >= 0.0 and math.isfinite(weight)):
            raise UserError(f"adversarial.lambda must be a finite number >= 0, got {weight}")
        step_size = section.get("step_size", "auto")
        pgd_step_size(1.0, steps, step_size)  # a bad rule stops here
        if ramp_epochs < 0:
            raise UserError(f"adversarial.ramp_epochs must be >= 0, got {ramp_epochs}")
        return cls(kind, eps255 / 255.0, steps, step_size, fraction, weight, ramp_epochs)

    def at_epoch(self, epoch: int) -> "AdversarialSettings":
        """The settings of (0-based) `epoch` under the ramp: eps and lambda times min(1, (epoch + 1) / ramp_epochs)."""
        if self.ramp_epochs <= 0 or epoch + 1 >= self.ramp_epochs:
            return self
        share = (epoch + 1) / self.ramp_epochs
        return replace(self, eps=self.eps * share, weight=self.weight * share, ramp_epochs=0)

    def step(self) -> float:
        """The attack's step size in [0, 1] units."""
        if self.kind == "fgsm" and self.step_size == "auto":
            return FGSM_RS_STEP * self.eps
        return pgd_step_size(self.eps, 1 if self.kind == "fgsm" else self.steps, self.step_size)

    def describe(self) -> str:
        ramp = f", ramped up over {self.ramp_epochs} epochs" if self.ramp_epochs > 0 else ""
        if self.kind == "lipschitz":
            return f"lipschitz regulariser, lambda {self.weight:g}, on {self.fraction:.0%} of each batch{ramp}"
        text = f"{self.kind} eps {self.eps * 255:g}/255"
        if self.kind != "fgsm":
            text += f", {self.steps} step(s) of {self.step() * 255:.3g}/255"
        if self.kind == "euc_at":
            text += f", lambda {self.weight:g}"
        return text + f", {self.fraction:.0%} of each batch attacked{ramp}"


def _unit_norm(rows: Tensor) -> Tensor:
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _safe_norm(rows: Tensor) -> Tensor:
    """Row L2 norms with a finite gradient at zero."""
    return (rows.pow(2).sum(dim=1) + 1e-24).sqrt()


def gradient_alignment(
    model: nn.Module, x_clean: Tensor, x_adv: Tensor, labels: Tensor, smoothing: float = EUC_AT_SMOOTHING
) -> Tensor:
    """EUC_AT's term: mean_i ||g^(x_i) - g^(x_adv_i)||_2, g^ the L2-normalised input gradient of the
    label-smoothed CE; differentiable in the model's parameters (double backpropagation)."""
    directions = []
    for x in (x_clean, x_adv):
        x = x.detach().requires_grad_(True)
        loss = F.cross_entropy(model(x).float(), labels, label_smoothing=smoothing, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x, create_graph=True)
        directions.append(_unit_norm(grad.flatten(1)))
    return _safe_norm(directions[0] - directions[1]).mean()


def feature_gradient_penalty(embed: nn.Module, x: Tensor) -> Tensor:
    """Chan-Hon-Tong et al.'s regulariser: mean_i ||grad_{x_i} ||f(x_i) - f_bar||^2||_1, f_bar the batch mean."""
    x = x.detach().requires_grad_(True)
    features = embed(x).float().flatten(1)
    spread = (features - features.mean(dim=0, keepdim=True).detach()).pow(2).sum()
    (grad,) = torch.autograd.grad(spread, x, create_graph=True)
    return grad.abs().flatten(1).sum(dim=1).mean()


class _UnitRangeEmbedding(nn.Module):
    def __init__(self, model: ChipClassifier, norm: tuple[float, float]) -> None:
        super().__init__()
        self.model, self.norm = model, norm

    def forward(self, x01: Tensor) -> Tensor:
        return self.model.embed(from_unit_range(x01, self.norm))


class AdversarialTask:
    """`task` with its loss computed on attacked (or gradient-penalised) chips; everything else delegated."""

    def __init__(
        self, task: Any, classifier: ChipClassifier, image_key: str, norm: tuple[float, float],
        settings: AdversarialSettings,
    ) -> None:
        if settings.kind in ("euc_at", "lipschitz") and distributed.is_distributed():
            raise UserError(
                f"adversarial.kind {settings.kind} trains through input gradients (double backpropagation), "
                "which DistributedDataParallel does not support: run this stage on one GPU"
            )
        self.task = task
        self.classifier = classifier
        self.image_key = image_key
        self.norm = (float(norm[0]), float(norm[1]))
        self.full_settings = self.settings = settings
        self.unit_model = UnitRangeModel(classifier, self.norm)

    def start_epoch(self, epoch: int) -> None:
        """Called by the training loop before each (0-based) epoch: the ramp's eps and lambda for it."""
        self.settings = self.full_settings.at_epoch(epoch)

    @property
    def module(self) -> nn.Module:
        return self.task.module

    @property
    def saved_module(self) -> nn.Module:
        return self.task.saved_module

    def train_mode(self) -> None:
        self.task.train_mode()

    def logits(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return self.task.logits(batch)

    def state_dict(self) -> dict[str, Tensor]:
        return self.task.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.task.load_state_dict(state)

    def attack(self, x01: Tensor, labels: Tensor) -> Tensor:
        """Adversarial [0, 1] chips for the configured kind (fgsm with random start, pgd, euc_at)."""
        s = self.settings
        if s.kind == "fgsm":
            start = (x01 + (2 * torch.rand_like(x01) - 1) * s.eps).clamp(0.0, 1.0)
            stepped = fgsm(self.unit_model, start, labels, s.step())
            return torch.min(torch.max(stepped, x01 - s.eps), x01 + s.eps).clamp(0.0, 1.0)
        # random starts come from torch's global RNG, which the training loop reseeds every epoch
        return pgd(self.unit_model, x01, labels, s.eps, s.steps, s.step(), random_start=True)

    def loss(self, batch: dict[str, Tensor], module: nn.Module | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        s = self.settings
        if not s.active:
            return self.task.loss(batch, module)
        x, labels = batch[self.image_key], batch["label"]
        n = max(1, math.ceil(s.fraction * len(x)))
        x01 = to_unit_range(x[:n].float(), self.norm)
        extra: dict[str, Tensor] = {}
        if s.kind == "lipschitz":
            total, parts = self.task.loss(batch, module)
            penalty = feature_gradient_penalty(_UnitRangeEmbedding(self.classifier, self.norm), x01)
            extra["lipschitz"] = penalty.detach()
            total = total + s.weight * penalty
        else:
            x_adv01 = self.attack(x01, labels[:n])
            attacked = dict(batch)
            attacked[self.image_key] = torch.cat([from_unit_range(x_adv01, self.norm).to(x.dtype), x[n:]])
            total, parts = self.task.loss(attacked, module)
            if s.kind == "euc_at":
                alignment = gradient_alignment(self.unit_model, x01, x_adv01, labels[:n])
                extra["euc"] = alignment.detach()
                total = total + s.weight * alignment
        return total, {**parts, **extra}


def with_adversarial(task: Any, settings: AdversarialSettings, norm: tuple[float, float]) -> Any:
    """`task` itself when kind is none, else wrapped in AdversarialTask (chip-input tasks only)."""
    if not settings.active:
        return task
    if isinstance(task, DistillTask):
        return AdversarialTask(task, task.student, "sar", norm, settings)
    if isinstance(task, ClassifierTask):
        return AdversarialTask(task, task.model, task.image_key, norm, settings)
    raise UserError(
        f"adversarial training needs a task trained on chips; {type(task).__name__} trains on embeddings"
    )
