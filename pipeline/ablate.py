"""Ablation runner: named variants (lists of `--set` overrides) x seeds, each through run_all, one table.

    python -m pipeline.ablate --data DIR --profile quick --seeds 3 --out DIR [--variants full,no-kd,no-voting]

Every (variant, seed) runs the four stages with `pipeline.experiment.run_pipeline`. Artifacts are
reused: per seed, variants whose pretrain/distill settings agree share one weights folder (so a
variant that changes only finetune_head or infer settings reruns only those stages; run_all's
`--skip-fresh` freshness decides), and a teacher trained with the same settings is copied into a
new folder instead of being trained again. `seconds` is the wall time of the run itself, so a
variant that reuses artifacts shows only what it added. A variant whose resolved config equals the
full pipeline's is not run again: its rows repeat the full pipeline's (column `same_as`).

Outputs in --out: `ablation.csv` (one row per variant and seed, written as rows finish; a rerun with
the same --out skips rows already there), `ablation_summary.csv` (mean ± standard error over seeds,
and the difference to the full pipeline with the standard error of the paired per-seed difference),
`ablation.png`, `profile.yaml` (the profile with the shared --set overrides, as every run read it: an
edit to the profile during an ablation changes nothing), and `runs/` (weights, submissions, logs).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

from pipeline.artifacts import ArtifactPaths, atomic_write_text
from pipeline.config import COMMON_SECTIONS, Config, load_config, stage_config, with_overrides
from pipeline.errors import UserError, exit_on_user_error
from pipeline.experiment import REPO_ROOT, RunOptions, mean_se, run_pipeline
from pipeline.log import make_console

OOD_METHODS = ("energy", "msp", "maxlogit", "knn", "mahalanobis", "vim")
FULL = "full"


@dataclass(frozen=True)
class Variant:
    """A named change to the profile: `--set` overrides; `requires` names a config key it needs (else left out)."""

    overrides: tuple[str, ...]
    description: str
    requires: str | None = None


VARIANTS: dict[str, Variant] = {
    FULL: Variant((), "the profile as it is"),
    "no-kd": Variant(("distill_sar.distill.kd_weight=0",), "no KL term to the EO teacher"),
    "kd": Variant(("distill_sar.distill.kd_weight=0.5",), "KL term to the EO teacher, weight 0.5 (off by default)"),
    "no-features": Variant(("distill_sar.distill.feature_weight=0",), "no feature alignment to the EO teacher"),
    "features": Variant(("distill_sar.distill.feature_weight=0.5",), "feature alignment to the EO teacher, weight 0.5 (off by default)"),
    "no-distill": Variant(("distill_sar.distill.kd_weight=0", "distill_sar.distill.feature_weight=0"),
                          "SAR student on labels alone (teacher unused)"),
    "kd-gate-none": Variant(("distill_sar.distill.gate=none",), "KD on every pair"),
    "kd-gate-correct": Variant(("distill_sar.distill.gate=correct",), "KD only where the teacher is right"),
    "kd-gate-confidence": Variant(("distill_sar.distill.gate=confidence",), "KD weighted by the teacher's p(true class)"),
    "kd-landed": Variant(("distill_sar.distill.temperature=4.0", "distill_sar.distill.kd_weight=1.0",
                          "distill_sar.distill.gate=none", "distill_sar.distill.feature_norm=none"),
                         "the landed KD recipe: T=4, weight 1, no gate, raw teacher features"),
    "no-tta": Variant(("infer.tta.views=[identity]", "infer.tta.scales=[1.0]"), "one view"),
    "tta-flips": Variant(("infer.tta.views=[identity,hflip,vflip,rot180]",), "4 flip/turn views"),
    "tta-auto": Variant(("infer.tta.views=auto",), "TTA views chosen on validation from infer.tta.candidates"),
    "no-voting": Variant(("infer.cluster.enabled=false",), "cluster voting off"),
    "voting": Variant(("infer.cluster.enabled=true",), "cluster voting on"),
    **{f"ood-{m}": Variant((f"infer.ood.method={m}",), f"OOD score: {m}") for m in OOD_METHODS},
    "ood-hypersphere": Variant(("infer.ood.method=hypersphere",), "OOD score: hypersphere head trained with virtual anomalies"),
    "pseudo-labels": Variant(("finetune_head.pseudo_labels.enabled=true",), "confident test chips added to the head's training"),
    "no-pseudo-labels": Variant(("finetune_head.pseudo_labels.enabled=false",), "no pseudo-labels"),
    # --- adversarial training (issue: robustness) -----------------------------------------------------
    # Left out automatically until distill_sar.adversarial.kind exists in the profile.
    "adv-fgsm": Variant(("distill_sar.adversarial.kind=fgsm",), "FGSM adversarial training",
                        requires="distill_sar.adversarial.kind"),
    "adv-pgd": Variant(("distill_sar.adversarial.kind=pgd",), "PGD adversarial training",
                       requires="distill_sar.adversarial.kind"),
    "adv-euc_at": Variant(("distill_sar.adversarial.kind=euc_at",), "EUC_AT: adversarial training + gradient alignment",
                          requires="distill_sar.adversarial.kind"),
    "adv-lipschitz": Variant(("distill_sar.adversarial.kind=lipschitz",), "Lipschitz-style regulariser",
                             requires="distill_sar.adversarial.kind"),
}
DEFAULT_VARIANTS = (FULL, "no-kd", "kd", "no-features", "features", "no-tta", "tta-flips", "tta-auto", "no-voting", "voting",
                    *(f"ood-{m}" for m in OOD_METHODS), "ood-hypersphere", "pseudo-labels", "no-pseudo-labels",
                    "adv-fgsm", "adv-pgd", "adv-euc_at", "adv-lipschitz")
CSV_COLUMNS = ("variant", "seed", "val_balanced_accuracy", "test_accuracy", "test_auroc", "test_competition_score",
               "seconds", "student_val_balanced_accuracy", "teacher_val_balanced_accuracy", "test_balanced_accuracy",
               "val_balanced_accuracy_se", "stages_run", "same_as", "exit")
# (column, label) of the figures summarised; the first two also get their difference to the full pipeline
SUMMARY_METRICS = (("val_balanced_accuracy", "val bal acc"), ("test_competition_score", "test score"),
                   ("test_accuracy", "test acc"), ("test_auroc", "test AUROC"),
                   ("student_val_balanced_accuracy", "student val bal acc"))
DIFF_METRICS = ("val_balanced_accuracy", "test_competition_score", "student_val_balanced_accuracy")


def has_key(cfg: Config, dotted: str) -> bool:
    node: Any = cfg.to_dict()
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def resolved_config(options: RunOptions, overrides: list[str] | tuple[str, ...], seed: int) -> Config:
    """The config every stage of this run resolves (profile, shared and variant overrides, seed, held-out classes)."""
    cfg = load_config(options.profile, [*options.overrides, *overrides])
    folded: dict[str, Any] = {"seed": seed}
    if options.holdout_classes:
        folded["data.holdout_classes"] = [c.strip() for c in options.holdout_classes.split(",") if c.strip()]
    return with_overrides(cfg, folded)


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def weights_key(cfg: Config) -> str:
    """Runs with equal keys may share a weights folder: same common sections, pretrain and distill settings."""
    tree = cfg.to_dict()
    return _digest({key: tree[key] for key in (*COMMON_SECTIONS, "pretrain_eo", "distill_sar")})


def finetune_key(cfg: Config) -> str:
    return _digest(cfg.finetune_head.model_dump(mode="json"))


def seed_teacher(folder: Path, seed_dir: Path, cfg: Config) -> bool:
    """Copy an eo_teacher made with this run's pretrain settings from a sibling folder; True if one was copied."""
    target = ArtifactPaths.of(folder, "eo_teacher")
    if target.manifest.is_file():
        return False
    wanted = json.dumps(stage_config(cfg, "pretrain_eo"), sort_keys=True)
    for sibling in sorted(seed_dir.glob("w-*")):
        source = ArtifactPaths.of(sibling, "eo_teacher")
        if sibling == folder or not (source.manifest.is_file() and source.weights.is_file()):
            continue
        try:
            config = json.loads(source.manifest.read_text()).get("config")
        except json.JSONDecodeError:
            continue
        if json.dumps(config, sort_keys=True) != wanted:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for src, dst in zip((source.weights, source.split, source.metrics_csv, source.manifest),
                            (target.weights, target.split, target.metrics_csv, target.manifest)):
            if src.is_file():
                shutil.copy2(src, dst)  # manifest last: a copy cut short is not taken for an artifact
        return True
    return False


def select_variants(names: list[str], base: Config) -> tuple[list[str], list[str]]:
    """(variants to run, variants left out because their config key is not in the profile); full first."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise UserError(f"--variants: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    names = [FULL] + [n for n in dict.fromkeys(names) if n != FULL]
    available = [n for n in names if VARIANTS[n].requires is None or has_key(base, VARIANTS[n].requires)]
    return available, [n for n in names if n not in available]


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    with path.open() as fh:
        for row in csv.DictReader(fh):
            parsed: dict[str, Any] = dict(row)
            for key in CSV_COLUMNS:
                if key in ("variant", "stages_run", "same_as"):
                    continue
                try:
                    parsed[key] = float(row.get(key, "nan"))
                except ValueError:
                    parsed[key] = float("nan")
            parsed["seed"], parsed["exit"] = int(parsed["seed"]), int(parsed["exit"])
            rows.append(parsed)
    return rows


def _write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["seed"], r["variant"])))
    tmp.replace(path)


def paired_difference(rows: list[dict[str, Any]], variant: str, key: str) -> tuple[float, float]:
    """Mean and standard error of (variant - full) over the seeds both have finite figures for."""
    full = {r["seed"]: r[key] for r in rows if r["variant"] == FULL}
    diffs = [r[key] - full[r["seed"]] for r in rows
             if r["variant"] == variant and r["seed"] in full and math.isfinite(r[key]) and math.isfinite(full[r["seed"]])]
    return mean_se(diffs)


def summarise(rows: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """One row per variant: seeds, mean and s.e. of each figure, paired difference to full, mean seconds."""
    summary = []
    for name in variants:
        mine = [r for r in rows if r["variant"] == name and r["exit"] == 0]
        row: dict[str, Any] = {"variant": name, "seeds": len(mine),
                               "seconds": float(np.mean([r["seconds"] for r in mine])) if mine else float("nan")}
        for key, _ in SUMMARY_METRICS:
            row[f"{key}_mean"], row[f"{key}_se"] = mean_se([r[key] for r in mine])
        for key in DIFF_METRICS:
            row[f"{key}_diff"], row[f"{key}_diff_se"] = (0.0, 0.0) if name == FULL else paired_difference(rows, name, key)
        row["same_as"] = mine[0]["same_as"] if mine else ""
        summary.append(row)
    return summary


def _fmt(mean: float, se: float, signed: bool = False) -> str:
    if not math.isfinite(mean):
        return "-"
    text = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    return f"{text} ± {se:.4f}" if math.isfinite(se) else text


def summary_table(summary: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title)
    for column in ("variant", "seeds", "val bal acc", "Δ val vs full", "test score", "Δ score vs full",
                   "test acc", "test AUROC", "student val", "s / run"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for row in summary:
        name = row["variant"] + (f" (= {row['same_as']})" if row["same_as"] else "")
        same = row["variant"] == FULL
        table.add_row(
            name, str(row["seeds"]),
            _fmt(row["val_balanced_accuracy_mean"], row["val_balanced_accuracy_se"]),
            "" if same else _fmt(row["val_balanced_accuracy_diff"], row["val_balanced_accuracy_diff_se"], signed=True),
            _fmt(row["test_competition_score_mean"], row["test_competition_score_se"]),
            "" if same else _fmt(row["test_competition_score_diff"], row["test_competition_score_diff_se"], signed=True),
            _fmt(row["test_accuracy_mean"], row["test_accuracy_se"]),
            _fmt(row["test_auroc_mean"], row["test_auroc_se"]),
            _fmt(row["student_val_balanced_accuracy_mean"], row["student_val_balanced_accuracy_se"]),
            f"{row['seconds']:.0f}" if math.isfinite(row["seconds"]) else "-",
        )
    return table


def save_plot(summary: list[dict[str, Any]], path: Path, title: str) -> None:
    """Mean ± s.e. of validation balanced accuracy and test score per variant, and their difference to full."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in summary]
    y = np.arange(len(names))[::-1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.6), sharey=True)
    for ax, key, label in ((axes[0], "val_balanced_accuracy", "validation balanced accuracy"),
                           (axes[1], "test_competition_score", "test competition score")):
        mean = np.array([r[f"{key}_mean"] for r in summary], dtype=float)
        se = np.nan_to_num(np.array([r[f"{key}_se"] for r in summary], dtype=float))
        ax.errorbar(mean, y, xerr=se, fmt="o", capsize=3)
        if summary and math.isfinite(summary[0][f"{key}_mean"]):
            ax.axvline(summary[0][f"{key}_mean"], color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel(f"{label} (mean ± s.e.)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(names)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def save_summary(summary: list[dict[str, Any]], path: Path) -> None:
    columns = list(summary[0]) if summary else ["variant"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(summary)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.ablate", description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO_ROOT / "data" / "synthetic", help="dataset root")
    p.add_argument("--profile", default="quick", help="quick | full | tiny | path/to/profile.yaml")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    p.add_argument("--out", type=Path, default=Path("ablation"), help="folder of ablation.csv, the summary, the plot and runs/")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override applied to every variant")
    p.add_argument("--cache-dir", type=Path, default=None, help="where packed arrays are cached (shared by every run)")
    p.add_argument("--holdout-classes", default=None)
    p.add_argument("--train-dir", default=None)
    p.add_argument("--test-dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--force", action="store_true", help="rerun rows already in ablation.csv")
    p.add_argument("--list", action="store_true", help="list the variants and exit")
    return p


def run_ablation(args: argparse.Namespace, console: Console) -> list[dict[str, Any]]:
    """Run every (seed, variant) not yet in ablation.csv; rows of all runs, the summary printed and saved."""
    if args.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {args.seeds}")
    if not args.data.is_dir():
        if args.data != REPO_ROOT / "data" / "synthetic":
            raise UserError(f"--data {args.data}: no such folder")
        subprocess.check_call([sys.executable, "-m", "pipeline.data.synth", "--out", str(args.data),
                               "--scale", "quick", "--seed", "0"], cwd=REPO_ROOT)
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file: give a folder")
    options = RunOptions(data=args.data.resolve(), profile=str(args.profile), overrides=list(args.overrides),
                         cache_dir=args.cache_dir.resolve() if args.cache_dir else None,
                         holdout_classes=args.holdout_classes, train_dir=args.train_dir, test_dir=args.test_dir,
                         device=args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    # every run reads one snapshot of the profile: an edit to the profile during a long ablation changes nothing
    snapshot = args.out / "profile.yaml"
    atomic_write_text(snapshot, yaml.safe_dump(load_config(args.profile, list(args.overrides)).to_dict(), sort_keys=False))
    options.profile, options.overrides = str(snapshot.resolve()), []
    base = resolved_config(options, [], 0)
    names, left_out = select_variants([n.strip() for n in args.variants.split(",") if n.strip()], base)
    for name in left_out:
        console.print(f"ablate: variant {name} left out: the profile has no {VARIANTS[name].requires} (not landed yet)")
    csv_path = args.out / "ablation.csv"
    rows = [] if args.force else [r for r in _read_rows(csv_path) if r["exit"] == 0]
    done = {(r["variant"], r["seed"]) for r in rows}
    start = time.perf_counter()
    for seed in range(args.seeds):
        configs = {name: resolved_config(options, VARIANTS[name].overrides, seed) for name in names}
        full_cfg = json.dumps(configs[FULL].to_dict(), sort_keys=True)
        # variants sharing weights run one after another, finetune settings grouped, so each stage runs once
        order = sorted(names, key=lambda n: (n != FULL, weights_key(configs[n]), finetune_key(configs[n])))
        seed_dir = args.out / "runs" / f"seed{seed}"
        for name in order:
            if (name, seed) in done:
                continue
            cfg = configs[name]
            if name != FULL and json.dumps(cfg.to_dict(), sort_keys=True) == full_cfg:
                full_row = next((r for r in rows if r["variant"] == FULL and r["seed"] == seed), None)
                if full_row is not None:
                    rows.append({**full_row, "variant": name, "same_as": FULL, "seconds": 0.0, "stages_run": ""})
                    _write_rows(csv_path, rows)
                    continue
            key = weights_key(cfg)
            folder = seed_dir / f"w-{key}"
            copied = seed_teacher(folder, seed_dir, cfg)
            log = seed_dir / "logs" / f"{name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            result = run_pipeline(options, list(VARIANTS[name].overrides), seed, folder, seed_dir / f"subs-{key}", log)
            if result.exit_code != 0:
                console.print(f"[red]ablate: {name} seed {seed} failed (exit {result.exit_code}); log {log}:[/]\n{result.log_tail}")
            row = {"variant": name, "seed": seed, **result.metrics, "seconds": round(result.seconds, 1),
                   "stages_run": " ".join(result.stages_run) + (" (teacher copied)" if copied else ""),
                   "same_as": "", "exit": result.exit_code}
            rows.append(row)
            _write_rows(csv_path, rows)
            console.print(f"ablate: {name} seed {seed}: val bal acc {row['val_balanced_accuracy']:.4f}  "
                          f"test score {row['test_competition_score']:.4f}  {row['seconds']:.0f} s  "
                          f"(ran: {row['stages_run'] or 'nothing'})", highlight=False)
    summary = summarise(rows, names)
    title = f"ablation on {args.data.name} ({Path(str(args.profile)).stem} profile, {args.seeds} seed(s))"
    console.print(summary_table(summary, title))
    save_summary(summary, args.out / "ablation_summary.csv")
    save_plot(summary, args.out / "ablation.png", title)
    console.print(f"ablate: {time.perf_counter() - start:.0f} s; rows {csv_path}, summary {args.out / 'ablation_summary.csv'}, "
                  f"plot {args.out / 'ablation.png'}", highlight=False)
    return rows


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = make_console()
    if args.list:
        for name, variant in VARIANTS.items():
            console.print(f"{name:20s} {variant.description}: {' '.join(variant.overrides) or '(no overrides)'}", highlight=False, markup=False)
        return 0
    rows = run_ablation(args, console)
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
