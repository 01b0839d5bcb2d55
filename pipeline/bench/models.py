"""Benchmark: model and recipe candidates, each trained end to end by run_all, over seeds.

Every candidate is a named list of `--set` overrides on a profile. Each (candidate, seed) runs the four
stages into its own temporary weights and submissions folders (the pack cache is shared), then the
table gives per candidate: validation balanced accuracy of the final SAR model (mean ± standard error
over seeds; this is what a default is chosen on), test accuracy and AUROC (reported after the choice,
when the test split is labelled), and the wall time of the stages. Rows go to a CSV as they finish.

With `--folds k` the repeats are the k folds of a k-fold cross-validation (seed 0, `data.val_fold` 0..k-1,
val_fraction 1/k, no per-class floor) instead of seeds: every training chip is validated once, so a
saturated hold-out (MSTAR: 0.99+) can still tell candidates apart. "Δ val" is the paired difference to
the first candidate over the same seeds or folds.

    python -m pipeline.bench models --data ../shared/data/mstar_soc --cache-dir .cache/packs --seeds 2
    python -m pipeline.bench models --candidates aconvnet,resnet18-resize --seeds 3
    python -m pipeline.bench models --data ... --candidates profile,epochs-40 --folds 5
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.experiment import RunOptions, format_mean_se, run_pipeline
from pipeline.log import make_console

# Candidates as overrides on the chosen profile; the profile's own recipe is "profile".
CANDIDATES: dict[str, list[str]] = {
    "profile": [],
    # The landed recipe before chip geometry: every chip resized to 56 px, ResNet-18 ImageNet stem.
    "resnet18-resize": [
        "model.name=resnet18", "data.sar_size=56", "data.sar_fit=resize", "data.sar_margin=0",
        "data.eo_size=32", "data.eo_fit=resize", "data.eo_margin=0", "data.intensity=none",
        "augment.hflip=true", "augment.vflip=true", "augment.rot90=true", "augment.shift=0.06", "augment.scale=0.1",
        "distill_sar.epochs=6", "infer.tta.views=[identity,hflip,vflip,rot90,rot180,rot270]",
    ],
    "resnet18-crop": ["model.name=resnet18"],
    "aconvnet": ["model.name=aconvnet"],
    "aconvnet_wide": ["model.name=aconvnet_wide"],
    "aconvnet_fast": ["model.name=aconvnet_fast"],
    "aconvnet-intensity-none": ["model.name=aconvnet", "data.intensity=none"],
    "aconvnet-intensity-log": ["model.name=aconvnet", "data.intensity=log"],
    "aconvnet-window-1.0": ["model.name=aconvnet", "data.sar_auto_fraction=1.0"],
    "flips-rot90": ["augment.hflip=true", "augment.vflip=true", "augment.rot90=true",
                    "infer.tta.views=[identity,hflip,vflip,rot90,rot180,rot270]"],
    "epochs-12": ["distill_sar.epochs=12"],
    "epochs-32": ["distill_sar.epochs=32"],
    "epochs-40": ["distill_sar.epochs=40"],
    "intensity-log": ["data.intensity=log"],
    "intensity-none": ["data.intensity=none"],
    "window-1.0": ["data.sar_auto_fraction=1.0"],
    "margin-0.2": ["data.sar_margin=0.2"],
    "batch-32": ["distill_sar.batch_size=32"],
    "batch-128": ["distill_sar.batch_size=128"],
    "batch-32-epochs-40": ["distill_sar.batch_size=32", "distill_sar.epochs=40"],
    "batch-32-ema": ["distill_sar.batch_size=32", "distill_sar.ema=0.998"],
    "tta-identity": ["infer.tta.views=[identity]"],
    "tta-shifts": ["infer.tta.views=[identity,shift_up,shift_down,shift_left,shift_right]"],
}
REPO_ROOT = Path(__file__).resolve().parents[2]


def fold_overrides(fold: int, folds: int) -> list[str]:
    """The `--set` overrides that make the validation split fold `fold` of a `folds`-fold cross-validation."""
    return [f"data.val_fraction={1.0 / folds!r}", f"data.val_fold={fold}", "data.val_min_per_class=0"]


def repeats(seeds: int, folds: int) -> list[tuple[int, int | None]]:
    """(seed, fold) of every run of a candidate: seeds 0..seeds-1 with the default split, or seed 0 and each fold."""
    return [(0, f) for f in range(folds)] if folds else [(s, None) for s in range(seeds)]


def paired_delta(rows: list[dict], name: str, reference: str, key: str = "val_balanced_accuracy") -> list[float]:
    """`key` of candidate `name` minus the reference's, over the (seed, fold) runs both have."""
    ref = {(r["seed"], r.get("fold")): r[key] for r in rows if r["candidate"] == reference}
    return [r[key] - ref[(r["seed"], r.get("fold"))] for r in rows
            if r["candidate"] == name and (r["seed"], r.get("fold")) in ref]


def run_candidate(name: str, overrides: list[str], seed: int, args: argparse.Namespace, console: Console) -> dict:
    """Train and infer one candidate with one seed in temporary folders (every stage rerun); its figures."""
    options = RunOptions(data=args.data, profile=args.profile, overrides=list(args.set), cache_dir=args.cache_dir,
                         holdout_classes=args.holdout_classes, train_dir=args.train_dir, test_dir=args.test_dir)
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        result = run_pipeline(options, overrides, seed, Path(tmp) / "weights", Path(tmp) / "submissions",
                              Path(tmp) / "log.txt", force=True)
    if result.exit_code != 0:
        console.print(f"[red]{name} seed {seed} failed (exit {result.exit_code}):[/]\n{result.log_tail}")
    return {"candidate": name, "seed": seed, "seconds": round(result.seconds, 1), "exit": result.exit_code,
            **{k: v for k, v in result.metrics.items() if k != "teacher_val_balanced_accuracy"}}


def _mean_se(values: list[float]) -> str:
    return format_mean_se(values)


def summary_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title)
    for column in ("candidate", "runs", "val bal acc (choice)", "Δ val (paired)", "val NLL", "test acc", "test AUROC",
                   "stage time (s)"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    names = list(dict.fromkeys(r["candidate"] for r in rows))
    for name in names:
        mine = [r for r in rows if r["candidate"] == name]
        delta = _mean_se(paired_delta(rows, name, names[0])) if name != names[0] else ""
        table.add_row(name, str(len(mine)), _mean_se([r["val_balanced_accuracy"] for r in mine]), delta,
                      _mean_se([r.get("val_nll", float("nan")) for r in mine]),
                      _mean_se([r["test_accuracy"] for r in mine]), _mean_se([r["test_auroc"] for r in mine]),
                      f"{np.mean([r['seconds'] for r in mine]):.0f}")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT / "data" / "synthetic")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--candidates", default="profile,resnet18-resize,resnet18-crop,aconvnet,aconvnet_wide",
                        help=f"comma-separated, from: {', '.join(CANDIDATES)}")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--folds", type=int, default=0, help="k-fold cross-validation (seed 0) instead of --seeds")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--holdout-classes", default=None)
    parser.add_argument("--train-dir", default=None)
    parser.add_argument("--test-dir", default=None)
    parser.add_argument("--set", action="append", default=[], help="override applied to every candidate")
    parser.add_argument("--out", type=Path, default=Path("bench-models.csv"), help="CSV of every (candidate, seed) run")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.candidates.split(",") if n.strip()]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        parser.error(f"unknown candidate(s) {', '.join(unknown)}; choose from {', '.join(CANDIDATES)}")
    console = make_console()
    if not args.data.is_dir() and args.data == REPO_ROOT / "data" / "synthetic":  # as run_all does
        subprocess.check_call([sys.executable, "-m", "pipeline.data.synth", "--out", str(args.data), "--scale", "quick", "--seed", "0"], cwd=REPO_ROOT)
    rows: list[dict] = []
    if args.folds == 1 or args.folds < 0:
        parser.error("--folds: 2 or more (0: seeds)")
    for seed, fold in repeats(args.seeds, args.folds):
        for name in names:
            extra = fold_overrides(fold, args.folds) if fold is not None else []
            row = {**run_candidate(name, CANDIDATES[name] + extra, seed, args, console), "fold": fold}
            rows.append(row)
            console.print(f"{name} seed {seed}{'' if fold is None else f' fold {fold}'}: val bal acc {row['val_balanced_accuracy']:.4f}  "
                          f"test acc {row['test_accuracy']:.4f}  AUROC {row['test_auroc']:.4f}  {row['seconds']:.0f} s")
            with args.out.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    unit = f"{args.folds} folds" if args.folds else f"{args.seeds} seeds"
    console.print(summary_table(rows, f"model candidates on {args.data} ({args.profile} profile, {unit})"))
    console.print(f"rows: {args.out}")


if __name__ == "__main__":
    main()
