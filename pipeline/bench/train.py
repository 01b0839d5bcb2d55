"""Benchmark: each training stage's images/s against the bare model's forward+backward rate.

Reads the per-epoch images/s that `fit` logged in `<weights>/<artifact>.metrics.csv` (best epoch
rate; the first epoch pays for warm-up) and times the bare model of the artifact (random input of the
same size, same batch size, forward + backward + AdamW step) on this machine. The ratio is the
training loop's overhead: data loading, augmentation, the teacher's forward in distillation, metrics.

    python -m pipeline.bench.train --weights weights --profile quick
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console
from rich.table import Table

from pipeline.artifacts import ArtifactPaths
from pipeline.registry import ARTIFACT_OF_STAGE
from pipeline.config import load_config
from pipeline.models import model_from_spec


def bare_rate(spec: dict, batch_size: int, steps: int = 6, head_only: bool = False) -> float:
    """Images/s of forward + backward + optimizer step on random chips (or embeddings for head_only)."""
    torch.manual_seed(0)
    model = model_from_spec(spec).train()
    h, w = spec["input_size"]
    if head_only:
        module, x = model.classifier, torch.randn(batch_size, model.embed_dim)
    else:
        module, x = model, torch.randn(batch_size, 1, h, w)
    y = torch.randint(0, spec["num_classes"], (batch_size,))
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(module(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return batch_size / sorted(times[1:])[len(times[1:]) // 2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=Path("weights"))
    parser.add_argument("--profile", default="quick", help="profile the artifacts were trained with (batch sizes)")
    args = parser.parse_args(argv)
    cfg = load_config(args.profile)
    console = Console()
    table = Table(title=f"training loop vs bare model ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    for col in ("stage", "input", "batch", "stage img/s", "bare fwd+bwd img/s", "stage / bare", "val bal acc"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    for stage, artifact in ARTIFACT_OF_STAGE.items():
        paths = ArtifactPaths.of(args.weights, artifact)
        if not paths.manifest.is_file() or not paths.metrics_csv.is_file():
            table.add_row(stage, "-", "-", "no artifact", "-", "-", "-")
            continue
        manifest = json.loads(paths.manifest.read_text())
        history = pd.read_csv(paths.metrics_csv)
        stage_rate = float(history["images_per_s"].max())
        stage_cfg = cfg.section(stage)
        batch = stage_cfg.batch_size
        head_only = stage == "finetune_head" and not stage_cfg.augment
        bare = bare_rate(manifest["model"], batch, head_only=head_only)
        size = "x".join(map(str, manifest["model"]["input_size"])) + (" (embeddings)" if head_only else "")
        table.add_row(stage, size, str(batch), f"{stage_rate:,.0f}", f"{bare:,.0f}", f"{stage_rate / bare:.2f}",
                      f"{manifest['metrics'].get('balanced_accuracy', float('nan')):.3f}")
    console.print(table)


if __name__ == "__main__":
    main()
