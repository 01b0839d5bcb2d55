"""Benchmark: training augmentation throughput of the DataLoader path and the device-resident path.

Random packed EO/SAR pairs (EO 37 px -> 31-px window, SAR 63 px -> 55-px window, the quick profile's
geometry on competition chips) are batched (256, uniform sampler) and augmented by each path, with the
quick profile's `augment` section (photometry and window crop only) and with every geometric transform on
as well (the tiny profile's section plus a 10-degree rotation). A rate counts pairs (one EO and one SAR
chip) per second after --warmup untimed batches. The resident path runs on --device (default CPU).

    python -m pipeline.bench augment --workers 0 2 --batches 20
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, Iterable

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from pipeline.config import load_config
from pipeline.data.augment import build_augmenter
from pipeline.data.datasets import PairedChipDataset
from pipeline.data.resident import ResidentBatches
from pipeline.data.samplers import make_sampler

EO_PACKED, EO_WINDOW, SAR_PACKED, SAR_WINDOW = 37, 31, 63, 55
NORM = (0.3, 0.2)


def augment_sections() -> dict[str, dict[str, Any]]:
    """The two augmentation settings timed: the quick profile's, and every geometric transform on."""
    return {
        "quick (photometry + window)": dict(load_config("quick").augment.model_dump()),
        "all geometry + photometry": {**load_config("tiny").augment.model_dump(), "rotate": 10.0},
    }


def _rate(batches: Iterable[dict[str, torch.Tensor]], n_batches: int, warmup: int) -> float:
    """Pairs per second over `n_batches` timed batches after `warmup` untimed ones."""
    iterator = iter(batches)
    for _ in range(warmup):
        next(iterator)
    count, start = 0, time.perf_counter()
    for _ in range(n_batches):
        count += len(next(iterator)["label"])
    return count / (time.perf_counter() - start)


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20_000, help="random packed pairs to draw from")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to time")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per path")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches before timing")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="device of the resident path")
    args = parser.parse_args(argv)
    console = Console()
    rng = np.random.default_rng(0)
    eo = rng.integers(0, 256, (args.pairs, EO_PACKED, EO_PACKED), dtype=np.uint8)
    sar = rng.integers(0, 256, (args.pairs, SAR_PACKED, SAR_PACKED), dtype=np.uint8)
    labels, rows = rng.integers(0, 10, args.pairs), np.arange(args.pairs)
    n_samples = args.batch_size * (args.batches + args.warmup)
    device = torch.device(args.device)
    table = Table(title=f"augmented EO {EO_WINDOW} + SAR {SAR_WINDOW} px pairs per second, batch {args.batch_size}, "
                  f"{os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    for column in ("augment", "path", "workers", "pairs/s"):
        table.add_column(column, justify="left" if column in ("augment", "path") else "right")
    for name, section in augment_sections().items():
        augment = build_augmenter(section)
        sampler = make_sampler("uniform", labels, 0.0, num_samples=n_samples, seed=0)
        dataset = PairedChipDataset(eo, sar, rows, rows, labels, NORM, NORM, augment, windows=(EO_WINDOW, SAR_WINDOW))
        for workers in args.workers:
            console.print(f"timing the DataLoader path, {name}, {workers} worker(s) ...")
            loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=workers,
                                drop_last=True)
            table.add_row(name, "DataLoader", str(workers), f"{_rate(loader, args.batches, args.warmup):,.0f}")
        console.print(f"timing the resident path on {device}, {name} ...")
        arrays = {"eo": (eo, rows, NORM, "eo", EO_WINDOW), "sar": (sar, rows, NORM, "sar", SAR_WINDOW)}
        resident = ResidentBatches(arrays, labels, sampler, args.batch_size, device, augment)
        table.add_row(name, f"resident ({device})", "", f"{_rate(resident, args.batches, args.warmup):,.0f}")
    console.print(table)


if __name__ == "__main__":
    main()
