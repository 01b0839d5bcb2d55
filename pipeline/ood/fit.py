"""Fitting a detector in the pipeline: the training split of the final SAR model, embedded with the
same TTA averaging as the test chips, fitted once; and the `auto` method read from the choice that
`stages.select_ood` wrote into the weights folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.artifacts import atomic_write_text
from pipeline.config import OODConfig
from pipeline.errors import UserError
from pipeline.ood import AUTO, OODDetector, make_detector
from pipeline.submission import report_json

CHOICE_FILE = "ood_choice.json"  # in the weights folder: written by stages.select_ood, read for method auto


def head_of(model: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """(weight (C, D), bias (C,)) of the model's linear classifier, float64."""
    layer = model.classifier
    return (layer.weight.detach().cpu().double().numpy(), layer.bias.detach().cpu().double().numpy())


def choice_path(weights_dir: str | Path) -> Path:
    return Path(weights_dir) / CHOICE_FILE


def write_choice(weights_dir: str | Path, choice: dict[str, Any]) -> Path:
    path = choice_path(weights_dir)
    atomic_write_text(path, report_json(choice))  # strict JSON: an undefined AUROC becomes null
    return path


def read_choice(weights_dir: str | Path, model_sha256: str) -> dict[str, Any]:
    """The choice of stages.select_ood for the model with weights digest `model_sha256`; UserError
    when it is missing, unreadable or was made for another model."""
    path = choice_path(weights_dir)
    if not path.is_file():
        raise UserError(f"infer.ood.method is {AUTO} but {path} is missing: run python -m stages.select_ood first")
    try:
        choice = json.loads(path.read_text())
        method, params = str(choice["method"]), dict(choice["params"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a valid OOD choice ({err}): run python -m stages.select_ood again") from None
    if choice.get("model_sha256") != model_sha256:
        raise UserError(f"{path} was chosen for another sar_final model: run python -m stages.select_ood again")
    return {**choice, "method": method, "params": params}


def resolve_detector(
    ood_cfg: OODConfig, weights_dir: str | Path, model_sha256: str, seed: int = 0
) -> tuple[OODDetector, dict[str, Any] | None]:
    """The unfitted detector `infer.ood.method` asks for, and the selection record when it is auto."""
    method = ood_cfg.method
    if method != AUTO:
        return make_detector(method, ood_cfg, seed=seed), None
    choice = read_choice(weights_dir, model_sha256)
    return make_detector(choice["method"], ood_cfg, seed=seed, **choice["params"]), choice
