"""L-infinity attacks (FGSM, PGD) on chips in [0, 1] image units.

The pipeline's models take dataset-normalised chips `(x01 - mean) / std` (pipeline.data.datasets) and
standardise each chip again inside the model (`ChipInput`). `UnitRangeModel` puts the dataset
normalisation in front of a model, so the attacks here perturb the [0, 1] chip: epsilon and step
sizes are stated in [0, 1] units (8/255 = eight grey levels of the 8-bit image) and every adversarial
chip is clipped to [0, 1]. Attacks maximise the cross-entropy of the true label and leave the
model's mode alone: callers put it in eval mode for evaluation (`evaluate_attack` does).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.errors import UserError

Logits = Callable[[Tensor], Tensor]


class UnitRangeModel(nn.Module):
    """`model` fed with chips in [0, 1]: applies the dataset normalisation (mean, std) first."""

    def __init__(self, model: nn.Module, norm: tuple[float, float]) -> None:
        super().__init__()
        self.model = model
        self.mean, self.std = float(norm[0]), float(norm[1])
        if not self.std > 0:
            raise UserError(f"normalisation std must be > 0, got {self.std}")

    def forward(self, x01: Tensor) -> Tensor:
        return self.model((x01 - self.mean) / self.std)


def to_unit_range(x: Tensor, norm: tuple[float, float]) -> Tensor:
    """Dataset-normalised chips back to [0, 1] units (clipped: augmentation may overshoot by rounding)."""
    return (x * float(norm[1]) + float(norm[0])).clamp(0.0, 1.0)


def from_unit_range(x01: Tensor, norm: tuple[float, float]) -> Tensor:
    """[0, 1] chips to the dataset normalisation the models take."""
    return (x01 - float(norm[0])) / float(norm[1])


def check_eps(eps: float) -> float:
    eps = float(eps)
    if not 0.0 <= eps <= 1.0:
        raise UserError(f"attack epsilon must be in [0, 1] image units (e.g. 8/255 = {8 / 255:.4f}), got {eps}")
    return eps


def input_gradient(model: Logits, x01: Tensor, labels: Tensor) -> Tensor:
    """d CE(model(x01), labels) / d x01 (summed over the batch, so each row gets its own chip's gradient)."""
    x = x01.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x).float(), labels, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad


def fgsm(model: Logits, x01: Tensor, labels: Tensor, eps: float) -> Tensor:
    """x + eps * sign(grad_x CE), clipped to [0, 1] (Goodfellow et al. 2015)."""
    eps = check_eps(eps)
    grad = input_gradient(model, x01, labels)
    return (x01.detach() + eps * grad.sign()).clamp(0.0, 1.0)


def pgd_step_size(eps: float, steps: int, rule: str | float) -> float:
    """`auto`: 2.5 * eps / steps (Madry et al.); a number: that fraction of eps per step."""
    if isinstance(rule, str):
        if rule != "auto":
            raise UserError(f"step_size '{rule}' is unknown: use auto (2.5 * eps / steps) or a fraction of eps, e.g. 0.25")
        return 2.5 * eps / max(int(steps), 1)
    value = float(rule)
    if not value > 0:
        raise UserError(f"step_size must be auto or a fraction of eps > 0, got {rule}")
    return value * eps


def pgd(
    model: Logits, x01: Tensor, labels: Tensor, eps: float, steps: int, step_size: float,
    random_start: bool = True, generator: torch.Generator | None = None,
) -> Tensor:
    """Projected gradient ascent on CE inside the L-inf ball of radius eps around x01, within [0, 1] (Madry et al. 2018)."""
    eps = check_eps(eps)
    if int(steps) < 1:
        raise UserError(f"PGD needs at least 1 step, got {steps}")
    x0 = x01.detach()
    if random_start:
        noise = torch.rand(x0.shape, generator=generator, device="cpu" if generator is None else generator.device)
        x = (x0 + (2.0 * noise.to(x0.device, x0.dtype) - 1.0) * eps).clamp(0.0, 1.0)
    else:
        x = x0.clone()
    for _ in range(int(steps)):
        grad = input_gradient(model, x, labels)
        x = x + float(step_size) * grad.sign()
        x = torch.min(torch.max(x, x0 - eps), x0 + eps).clamp(0.0, 1.0)
    return x.detach()
