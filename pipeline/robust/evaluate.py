"""Accuracy under attack over an epsilon grid: the `robustness` config section, the table, CSV and plot.

Attacks run on single views (no test-time augmentation) with the model in eval mode. Every attack
of one batch starts from the same clean chips; PGD uses a random start drawn from a generator seeded
per batch, so a rerun gives the same numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pipeline.artifacts import atomic_write, atomic_write_text
from pipeline.errors import UserError
from pipeline.robust.attacks import UnitRangeModel, fgsm, pgd, pgd_step_size, to_unit_range

CSV_COLUMNS = ("split", "attack", "steps", "eps_255", "eps", "accuracy", "correct", "chips", "seconds")


@dataclass(frozen=True)
class RobustnessSettings:
    """The `robustness` section; `eps` in [0, 1] units (the config states it in 1/255 units)."""

    enabled: bool = False
    eps: tuple[float, ...] = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
    pgd_steps: tuple[int, ...] = (10, 50)
    step_size: str | float = "auto"
    max_chips: int | None = None
    batch_size: int = 128

    @classmethod
    def from_config(cls, section: dict[str, Any] | None) -> "RobustnessSettings":
        section = dict(section or {})
        # unknown keys, types and ranges are the schema's (pipeline.config); this converts units
        try:
            eps255 = [float(e) for e in section.get("eps", [1, 2, 4, 8])]
            steps = [int(s) for s in section.get("pgd_steps", [10, 50])]
            batch_size = int(section.get("batch_size", 128))
            max_chips = section.get("max_chips")
            max_chips = None if max_chips is None else int(max_chips)
        except (TypeError, ValueError):
            raise UserError("robustness: eps and pgd_steps must be lists of numbers; batch_size and max_chips numbers") from None
        if not eps255 or any(not 0.0 < e <= 255.0 for e in eps255):
            raise UserError(f"robustness.eps is a list in 1/255 units, each in (0, 255], got {eps255}")
        if any(s < 1 for s in steps):
            raise UserError(f"robustness.pgd_steps must all be >= 1, got {steps}")
        if batch_size < 1:
            raise UserError(f"robustness.batch_size must be >= 1, got {batch_size}")
        if max_chips is not None and max_chips < 1:
            raise UserError(f"robustness.max_chips must be null or >= 1, got {max_chips}")
        step_size = section.get("step_size", "auto")
        pgd_step_size(1.0, 1, step_size)  # a bad rule stops here
        return cls(bool(section.get("enabled", False)), tuple(sorted(e / 255 for e in eps255)), tuple(steps),
                   step_size, max_chips, batch_size)

    def attacks(self) -> list[tuple[str, int]]:
        """(attack, steps) in table order: fgsm, then pgd-k for every k."""
        return [("fgsm", 1)] + [("pgd", k) for k in self.pgd_steps]


def subsample(n: int, max_chips: int | None, seed: int) -> np.ndarray:
    """Positions of at most `max_chips` of `n` items (seeded, sorted); all when max_chips is None."""
    if max_chips is None or n <= max_chips:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_chips, replace=False))


def evaluate_split(
    model: nn.Module, dataset: Dataset, norm: tuple[float, float], settings: RobustnessSettings,
    device: torch.device, seed: int, split: str,
) -> list[dict[str, Any]]:
    """Rows of the table for one split: clean accuracy, then every attack at every epsilon."""
    model.eval()
    attacked = UnitRangeModel(model, norm).to(device)
    keys = [("clean", 0, 0.0)] + [(a, k, e) for e in settings.eps for a, k in settings.attacks()]
    correct = {key: 0 for key in keys}
    seconds = {key: 0.0 for key in keys}
    total = 0
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=False)
    for b, batch in enumerate(loader):
        x01 = to_unit_range(batch["image"].to(device), norm)
        labels = batch["label"].to(device)
        total += len(labels)
        for key in keys:
            attack, steps, eps = key
            start = time.perf_counter()
            if attack == "clean":
                adv = x01
            elif attack == "fgsm":
                adv = fgsm(attacked, x01, labels, eps)
            else:
                generator = torch.Generator(device=device).manual_seed(seed * 100_003 + b)
                adv = pgd(attacked, x01, labels, eps, steps, pgd_step_size(eps, steps, settings.step_size),
                          random_start=True, generator=generator)
            with torch.no_grad():
                correct[key] += int((attacked(adv).argmax(dim=1) == labels).sum())
            seconds[key] += time.perf_counter() - start
    if total == 0:
        raise UserError(f"the {split} split has no labelled chips to attack")
    return [
        {"split": split, "attack": a if a != "pgd" else f"pgd-{k}", "steps": k, "eps_255": round(e * 255, 6),
         "eps": e, "accuracy": correct[(a, k, e)] / total, "correct": correct[(a, k, e)], "chips": total,
         "seconds": seconds[(a, k, e)]}
        for a, k, e in keys
    ]


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    atomic_write_text(path, pd.DataFrame(list(rows), columns=list(CSV_COLUMNS)).to_csv(index=False))


def write_plot(path: Path, rows: Sequence[dict[str, Any]], title: str) -> None:
    """Accuracy vs epsilon per attack, one panel per split; clean accuracy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = pd.DataFrame(list(rows))
    splits = list(dict.fromkeys(table["split"]))
    fig, axes = plt.subplots(1, len(splits), figsize=(5 * len(splits), 4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        part = table[table["split"] == split]
        clean = part[part["attack"] == "clean"]["accuracy"].iloc[0]
        ax.axhline(clean, color="black", linestyle="--", label=f"clean {clean:.3f}")
        for attack in dict.fromkeys(part[part["attack"] != "clean"]["attack"]):
            curve = part[part["attack"] == attack].sort_values("eps_255")
            ax.plot(curve["eps_255"], curve["accuracy"], marker="o", label=attack)
        ax.set_xlabel("epsilon (1/255 of the [0, 1] chip)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0.0, 1.02)
        ax.set_title(f"{split} ({int(part['chips'].iloc[0])} chips)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100))
    plt.close(fig)
