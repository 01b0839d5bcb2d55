"""Benchmark: packing rate, and the training loader from packed arrays vs decoding PNGs every access.

The synthetic dataset (official layout) is generated once under --data-dir and reused. Packing runs
into a fresh cache folder every time. Both loaders yield the same EO/SAR pairs (batch 256, weighted
sampler), once with the quick profile's training augmentation and once without; the first --warmup
batches (worker start-up) are not timed. A rate counts pairs: one EO and one SAR chip each.

    python -m pipeline.bench.data --scale quick --workers 0 2
    python -m pipeline.bench.data --pairs 100000
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from pipeline.config import load_config
from pipeline.data import synth
from pipeline.data.augment import BatchAugmenter, build_augmenter
from pipeline.data.datasets import Norm, PairedChipDataset
from pipeline.data.geometry import resolve_geometry
from pipeline.data.layout import discover_layout
from pipeline.data.pack import PackedData, decode_chip, pack_dataset
from pipeline.data.samplers import make_sampler
from pipeline.errors import exit_on_user_error


class PngPairedDataset(PairedChipDataset):
    """PairedChipDataset that decodes and resizes both PNGs on every access (the baseline)."""

    def __init__(
        self,
        eo_paths: list[str],
        sar_paths: list[str],
        labels: np.ndarray,
        eo_size: int,
        sar_size: int,
        interpolation: str,
        eo_norm: Norm,
        sar_norm: Norm,
        augment: BatchAugmenter | None = None,
        seed: int = 0,
    ) -> None:
        # The parent class reads packed arrays; this variant decodes files instead, so it hands the
        # parent one blank chip per modality (shapes only) and overrides _load_pair.
        blank_eo = np.zeros((1, eo_size, eo_size), np.uint8)
        blank_sar = np.zeros((1, sar_size, sar_size), np.uint8)
        rows = np.zeros(len(labels), dtype=np.int64)
        super().__init__(blank_eo, blank_sar, rows, rows, labels, eo_norm, sar_norm, augment, seed)
        self.eo_paths, self.sar_paths = eo_paths, sar_paths
        self.eo_size, self.sar_size, self.interpolation = eo_size, sar_size, interpolation

    def _load_pair(self, index: int) -> tuple[np.ndarray | None, np.ndarray]:
        eo_path = self.eo_paths[index]
        eo = decode_chip(eo_path, self.eo_size, self.interpolation) if eo_path else None
        return eo, decode_chip(self.sar_paths[index], self.sar_size, self.interpolation)


def _loader_rate(dataset: PairedChipDataset, workers: int, batch_size: int, batches: int, warmup: int) -> float:
    """Pairs per second over `batches` timed batches after `warmup` untimed ones."""
    sampler = make_sampler("weighted", dataset.labels, 0.5, num_samples=batch_size * (batches + warmup), seed=0)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, drop_last=True)
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    count = 0
    for batch in iterator:
        count += len(batch["label"])
    return count / (time.perf_counter() - start)


def _dataset_dir(args: argparse.Namespace, console: Console) -> Path:
    scale = args.pairs if args.pairs is not None else args.scale
    out = args.data_dir / f"synth-{scale}-seed{args.seed}"
    if not out.is_dir():
        console.print(f"generating the synthetic dataset ({scale}) in {out} ...")
        info = synth.generate(out, scale, args.seed)
        console.print(f"generated {info['n_train']:,} pairs + {info['n_test']:,} test chips in {info['seconds']} s")
    return out


def _peak_rss_mib() -> tuple[float, float]:
    """Peak resident memory (MiB) of this process and of its largest finished child."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 1024**2
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
    return own, children


def _datasets(
    packed: PackedData, eo_size: int, sar_size: int, interpolation: str, augment: BatchAugmenter | None
) -> tuple[PairedChipDataset, PngPairedDataset]:
    index = packed.train_index[packed.train_index["sar_row"] >= 0]
    labels = index["class_id"].to_numpy()
    packed_set = PairedChipDataset(
        packed.train_eo, packed.train_sar, index["eo_row"].to_numpy(), index["sar_row"].to_numpy(), labels,
        packed.norm["eo"], packed.norm["sar"], augment,
    )
    png_set = PngPairedDataset(
        index["eo_path"].tolist(), index["sar_path"].tolist(), labels, eo_size, sar_size, interpolation,
        packed.norm["eo"], packed.norm["sar"], augment,
    )
    return packed_set, png_set


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="quick", help="synthetic scale: tiny | quick | full (default quick)")
    parser.add_argument("--pairs", type=int, default=None, help="number of training pairs (overrides --scale)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to time")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per loader")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches before timing")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--pack-workers", type=int, default=None, help="decode processes (default: all cores)")
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "bench_data")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    console = Console()
    data_cfg = load_config("quick").data

    dataset_dir = _dataset_dir(args, console)
    start = time.perf_counter()
    layout = discover_layout(dataset_dir)
    discover_s = time.perf_counter() - start
    eo_size = resolve_geometry(data_cfg, "eo", [item.eo_path for item in layout.train]).packed
    sar_size = resolve_geometry(data_cfg, "sar", [item.sar_path for item in layout.train]).packed
    interpolation = data_cfg.interpolation
    n_images = sum((item.eo_path is not None) + (item.sar_path is not None) for item in layout.train) + len(layout.test)
    args.data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.data_dir, prefix="packs-") as cache:
        start = time.perf_counter()
        packed = pack_dataset(
            layout, eo_size, sar_size, interpolation, Path(cache), workers=args.pack_workers, console=console
        )
        pack_s = time.perf_counter() - start
        start = time.perf_counter()
        pack_dataset(layout, eo_size, sar_size, interpolation, Path(cache), console=console)
        reuse_s = time.perf_counter() - start
        rates = {}
        for augmented in (True, False):
            augment = build_augmenter(load_config("quick").augment.model_dump()) if augmented else None
            packed_set, png_set = _datasets(packed, eo_size, sar_size, interpolation, augment)
            for workers in args.workers:
                for name, dataset in (("packed", packed_set), ("PNG", png_set)):
                    console.print(f"timing the {name} loader, augmentation {augmented}, {workers} worker(s) ...")
                    rate = _loader_rate(dataset, workers, args.batch_size, args.batches, args.warmup)
                    rates[name, augmented, workers] = rate
        del packed, packed_set, png_set

    own_mib, child_mib = _peak_rss_mib()
    table = Table(
        title=f"{len(layout.train):,} pairs + {len(layout.test):,} test chips, EO {eo_size} px, SAR {sar_size} px, "
        f"{os.cpu_count()} cores; loaders: {args.batches} batches of {args.batch_size} timed"
    )
    for column in ("step", "augment", "workers", "rate", "packed / PNG"):
        table.add_column(column, justify="left" if column == "step" else "right")
    pack_workers = args.pack_workers or os.cpu_count()
    pack_rate = f"{n_images / pack_s:,.0f} img/s"
    table.add_row(f"discover layout, {discover_s:.1f} s", "", "", f"{n_images / discover_s:,.0f} files/s", "")
    table.add_row(f"pack {n_images:,} images, {pack_s:.1f} s", "", str(pack_workers), pack_rate, "")
    table.add_row(f"pack again (cache hit), {reuse_s:.1f} s", "", "", f"{n_images / reuse_s:,.0f} files/s", "")
    for augmented in (True, False):
        for workers in args.workers:
            packed_rate, png_rate = rates["packed", augmented, workers], rates["PNG", augmented, workers]
            flag = "train" if augmented else "none"
            ratio = f"{packed_rate / png_rate:.1f}x"
            table.add_row("loader: packed arrays", flag, str(workers), f"{packed_rate:,.0f} pairs/s", ratio)
            table.add_row("loader: PNG every access", flag, str(workers), f"{png_rate:,.0f} pairs/s", "")
    table.add_row("peak RSS: main / largest child", "", "", f"{own_mib:,.0f} / {child_mib:,.0f} MiB", "")
    console.print(table)


if __name__ == "__main__":
    main()
