"""Benchmark: each training stage's images/s against the bare model's forward+backward rate.

Reads the per-epoch images/s that `fit` logged in `<weights>/<artifact>.metrics.csv` (best epoch
rate; the first epoch pays for warm-up) and times the bare model of the artifact (random input of the
same size, the batch the stage really drew, forward + backward + AdamW step) on the same device, with
the same bf16 autocast on CUDA. The ratio is the training loop's overhead: data loading, augmentation,
the teacher's forward in distillation, metrics.

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
from pipeline.stage import select_device


def bare_rate(spec: dict, batch_size: int, steps: int = 12, head_only: bool = False,
              device: torch.device = torch.device("cpu")) -> float:
    """Images/s of forward + backward + optimizer step on random chips (or embeddings for head_only), median step."""
    torch.manual_seed(0)
    h, w = training_input(spec)
    model = model_from_spec({**spec, "input_size": [h, w]}).train().to(device)  # fixed-size models (ViT) too
    if head_only:
        module, x = model.classifier, torch.randn(batch_size, model.embed_dim, device=device)
    else:
        module, x = model, torch.randn(batch_size, 1, h, w, device=device)
    y = torch.randint(0, spec["num_classes"], (batch_size,), device=device)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(module(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    warm = times[max(1, steps // 4):]  # the first steps pay for allocation and kernel choice
    return batch_size / sorted(warm)[len(warm) // 2]


def training_input(spec: dict) -> tuple[int, int]:
    """The chip size the stage trained at: the window it crops (`spec["window"]`), else the stored size."""
    return (spec["window"],) * 2 if spec.get("window") else tuple(spec["input_size"])


def _last(history: pd.DataFrame, column: str) -> int | None:
    return int(history[column].dropna().iloc[-1]) if column in history and history[column].notna().any() else None


def trained_batch_size(history: pd.DataFrame, configured: int) -> tuple[int, bool]:
    """(batch one process drew, whether it was recorded): metrics.csv `batch_size` (min_steps_per_epoch may have
    lowered the configured one); an older metrics.csv has none, and the configured batch stands in."""
    recorded = _last(history, "batch_size")
    return (configured, False) if recorded is None else (recorded, True)


def per_process_rate(history: pd.DataFrame) -> float:
    """The stage's best images/s per process (metrics.csv counts all processes of a torchrun together)."""
    return float(history["images_per_s"].max()) / (_last(history, "processes") or 1)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=Path, default=Path("weights"))
    parser.add_argument("--profile", default="quick", help="profile the artifacts were trained with (batch sizes)")
    parser.add_argument("--device", default="auto", help="where the bare model is timed: the stages' device (auto | cpu | cuda)")
    args = parser.parse_args(argv)
    device = select_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the stages set it
    cfg = load_config(args.profile)
    console = Console()
    table = Table(title=f"training loop vs bare model ({_device_name(device)})")
    for col in ("stage", "input", "batch", "stage img/s per process", "bare fwd+bwd img/s", "stage / bare", "val bal acc"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    for stage, artifact in ARTIFACT_OF_STAGE.items():
        paths = ArtifactPaths.of(args.weights, artifact)
        if not paths.manifest.is_file() or not paths.metrics_csv.is_file():
            table.add_row(stage, "-", "-", "no artifact", "-", "-", "-")
            continue
        manifest = json.loads(paths.manifest.read_text())
        history = pd.read_csv(paths.metrics_csv)
        stage_rate = per_process_rate(history)
        stage_cfg = cfg.section(stage)
        batch, recorded = trained_batch_size(history, stage_cfg.batch_size)
        head_only = stage == "finetune_head" and not stage_cfg.augment
        spec = manifest["model"]
        bare = bare_rate(spec, batch, head_only=head_only, device=device)
        size = "x".join(map(str, training_input(spec))) + (" (embeddings)" if head_only else "")
        table.add_row(stage, size, str(batch) if recorded else f"{batch} (configured)", f"{stage_rate:,.0f}", f"{bare:,.0f}", f"{stage_rate / bare:.2f}",
                      f"{manifest['metrics'].get('balanced_accuracy', float('nan')):.3f}")
    console.print(table)


if __name__ == "__main__":
    main()
