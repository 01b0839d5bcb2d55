"""Run the whole pipeline (run_all) for one list of `--set` overrides and one seed, and collect its figures.

The one piece of code behind `pipeline.bench models` (candidates x seeds, fresh folders) and
`pipeline.ablate` (variants x seeds, shared folders so that variants reuse earlier stages' artifacts).
A run is `python -m pipeline.run_all` in its own process; its figures are read afterwards from the
artifacts' manifests (validation) and the newest submission's score.json (test).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import ARTIFACT_OF_STAGE, ArtifactPaths
from pipeline.errors import UserError
from pipeline.submission import SCORE_FILE, latest_submission, submission_folders

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_KEYS = ("accuracy", "balanced_accuracy", "auroc", "competition_score")


@dataclass
class RunOptions:
    """What every run of one experiment shares: data, profile, extra overrides and run_all flags."""

    data: Path
    profile: str = "quick"
    overrides: list[str] = field(default_factory=list)
    cache_dir: Path | None = None
    holdout_classes: str | None = None
    train_dir: str | None = None
    test_dir: str | None = None
    device: str = "auto"


@dataclass
class RunResult:
    """The figures of one (overrides, seed) run; NaN where a figure is not available."""

    exit_code: int
    seconds: float
    stages_run: list[str]
    metrics: dict[str, float]
    log_tail: str = ""


def manifest_metric(weights: Path, artifact: str, key: str) -> float:
    """metrics[key] of an artifact's manifest, NaN when missing."""
    path = ArtifactPaths.of(weights, artifact).manifest
    if not path.is_file():
        return float("nan")
    value = json.loads(path.read_text()).get("metrics", {}).get(key)
    return float(value) if isinstance(value, (int, float)) else float("nan")


def _manifest_stamps(weights: Path) -> dict[str, int]:
    stamps = {}
    for stage, artifact in ARTIFACT_OF_STAGE.items():
        path = ArtifactPaths.of(weights, artifact).manifest
        stamps[stage] = path.stat().st_mtime_ns if path.is_file() else -1
    return stamps


def run_all_command(options: RunOptions, overrides: list[str], seed: int, weights: Path, submissions: Path,
                    force: bool) -> list[str]:
    """The run_all command line of one run (one model: ensemble.members 1); without `force`, stages whose artifacts
    are up to date are skipped."""
    cmd = [sys.executable, "-m", "pipeline.run_all", "--data", str(options.data), "--profile", str(options.profile),
           "--weights", str(weights), "--submissions", str(submissions), "--seed", str(seed),
           "--device", options.device]
    for flag, value in (("--cache-dir", options.cache_dir), ("--holdout-classes", options.holdout_classes),
                        ("--train-dir", options.train_dir), ("--test-dir", options.test_dir)):
        if value:
            cmd += [flag, str(value)]
    if any(item.split("=", 1)[0].strip() == "ensemble.members" for item in [*options.overrides, *overrides]):
        raise UserError("ensemble.members: an experiment's runs are its seeds, one model each (their figures are read "
                        "from weights/); leave it out, and average finished runs with python -m stages.ensemble")
    for item in [*options.overrides, *overrides, "ensemble.members=1"]:  # the runs are the seeds: one model each,
        cmd += ["--set", item]                                            # whose figures are read from weights/
    if force:
        cmd.append("--force")
    return cmd


def run_pipeline(options: RunOptions, overrides: list[str], seed: int, weights: Path, submissions: Path,
                 log: Path, force: bool = False) -> RunResult:
    """Run the four stages into `weights` / `submissions` (stdout to `log`) and collect the run's figures.

    Figures: validation balanced accuracy (and its s.e.) of sar_final, of sar_student and of eo_teacher
    from their manifests, and sar_final's validation NLL; accuracy, balanced accuracy, AUROC and competition score of the new (or
    re-confirmed) submission. `stages_run` names the stages whose artifact changed (infer: a new
    submission folder), so a caller can see what was reused.
    """
    weights.mkdir(parents=True, exist_ok=True)
    submissions.mkdir(parents=True, exist_ok=True)
    before = _manifest_stamps(weights)
    known_subs = submission_folders(submissions)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.call(run_all_command(options, overrides, seed, weights, submissions, force),
                             cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    after = _manifest_stamps(weights)
    stages_run = [stage for stage in ARTIFACT_OF_STAGE if after[stage] != before[stage] and after[stage] != -1]
    submission = latest_submission(submissions) if rc == 0 else None
    if submission is not None and submission.name not in known_subs:
        stages_run.append("infer")
    metrics = {
        "val_balanced_accuracy": manifest_metric(weights, "sar_final", "balanced_accuracy"),
        "val_balanced_accuracy_se": manifest_metric(weights, "sar_final", "balanced_accuracy_se"),
        "val_nll": manifest_metric(weights, "sar_final", "loss"),  # finer than accuracy when that is near 1
        "student_val_balanced_accuracy": manifest_metric(weights, "sar_student", "balanced_accuracy"),
        "teacher_val_balanced_accuracy": manifest_metric(weights, "eo_teacher", "balanced_accuracy"),
    }
    score: dict[str, Any] = {}
    if submission is not None and (submission / SCORE_FILE).is_file():
        score = json.loads((submission / SCORE_FILE).read_text())
    for key in TEST_KEYS:
        value = score.get(key)
        metrics[f"test_{key}"] = float(value) if isinstance(value, (int, float)) else float("nan")
    if rc != 0:
        metrics = {k: float("nan") for k in metrics}  # a failed run's leftovers are not its figures
    tail = "\n".join(log.read_text().splitlines()[-40:]) if rc != 0 else ""  # the stage's error, the summary table
    return RunResult(exit_code=rc, seconds=seconds, stages_run=stages_run, metrics=metrics, log_tail=tail)


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (ddof 1) of the finite values; NaN where undefined (none, or one value for the s.e.)."""
    finite = np.asarray([v for v in values if isinstance(v, (int, float)) and math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return float("nan"), float("nan")
    se = float(finite.std(ddof=1) / math.sqrt(finite.size)) if finite.size > 1 else float("nan")
    return float(finite.mean()), se


def format_mean_se(values: list[float], digits: int = 4) -> str:
    """'mean ± s.e.' (or the mean alone with one value, '-' with none)."""
    mean, se = mean_se(values)
    if not math.isfinite(mean):
        return "-"
    return f"{mean:.{digits}f} ± {se:.{digits}f}" if math.isfinite(se) else f"{mean:.{digits}f}"
