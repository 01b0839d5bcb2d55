"""End-to-end driver behind run_all.sh: data if needed, the four stages in order (stages.select_ood before
infer when infer.ood.method is auto, stages.robustness after it when robustness.enabled), one summary table.
With ensemble.members N > 1 (the full profile), the stages run once per seed (seed .. seed+N-1, each in
<weights>/seed<S>/ and <submissions>/seed<S>/) and stages.ensemble averages the N submissions into <submissions>.

Each stage runs in its own process (under torchrun with --gpus N > 1). A stage whose artifact is up to
date (same config, dataset and parents) is skipped by the stage itself unless --force. A failing stage ends the
run with its own message, the summary table so far (its row says failed) and its exit code; earlier artifacts
stay, and a rerun picks up there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from pipeline.artifacts import ArtifactPaths
from pipeline.cli import DEFAULT_DATA, DEFAULT_SUBMISSIONS, REPO_ROOT, add_run_flags, forward_run_flags
from pipeline.data.synth import GENERATOR_VERSION
from pipeline.errors import UserError, exit_on_user_error
from pipeline.log import make_console, rule
from pipeline.ood import AUTO
from pipeline.ood.fit import choice_path
from pipeline.config import load_config
from pipeline.registry import ARTIFACT_OF_STAGE, PIPELINE, TRAINING_STAGES
from pipeline.status import read_status
from pipeline.submission import latest_submission, submission_folders

ROBUSTNESS_STAGE, ROBUSTNESS_ARTIFACT = "robustness", "sar_final"  # run after infer when robustness.enabled
SELECT_OOD_STAGE = "select_ood"  # run before infer when infer.ood.method is auto


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bash run_all.sh",
        description="Run pretrain_eo -> distill_sar -> finetune_head -> infer and print one summary table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_run_flags(p)  # --data, --weights, --profile, --set, ...: passed on to every stage
    p.add_argument("--from", dest="from_stage", choices=PIPELINE, default=None, help="start at this stage")
    p.add_argument("--only", choices=PIPELINE, default=None, help="run only this stage")
    p.add_argument("--force", action="store_true", help="rerun stages even when their artifacts are up to date")
    p.add_argument("--resume", action="store_true", help="continue interrupted training from its last epoch checkpoint")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per training stage (torchrun --nproc_per_node)")
    p.add_argument("--submissions", type=Path, default=DEFAULT_SUBMISSIONS)
    p.add_argument("--synth-scale", default="quick", help="scale of the synthetic dataset generated when --data is not given")
    return p


def selected_stages(args: argparse.Namespace) -> list[str]:
    """The stages to run in order; with infer, select_ood goes first when infer.ood.method is auto (it rewrites
    weights/ood_choice.json only when sar_final or its settings changed) and robustness follows when
    robustness.enabled is true."""
    if args.only:
        stages = [args.only]
    else:
        start = PIPELINE.index(args.from_stage) if args.from_stage else 0
        stages = list(PIPELINE[start:])
    if "infer" in stages:
        cfg = load_config(args.profile, args.overrides)
        if cfg.infer.ood.method == AUTO:
            stages.insert(stages.index("infer"), SELECT_OOD_STAGE)
        if cfg.robustness.enabled:
            stages.append(ROBUSTNESS_STAGE)
    return stages


def check_gpus(args: argparse.Namespace) -> None:
    """--gpus N > 1 needs N CUDA devices, unless --device cpu asks for N CPU processes (gloo).

    Checked before torchrun starts, so too many processes end with one line instead of every
    process's traceback.
    """
    if args.gpus < 1:
        raise UserError("--gpus must be at least 1")
    if args.gpus == 1 or args.device == "cpu":
        return
    visible = torch.cuda.device_count()
    if visible < args.gpus:
        raise UserError(
            f"--gpus {args.gpus}: more processes than GPUs ({visible} CUDA device(s) visible): "
            f"use --gpus {max(visible, 1)} or fewer, or --device cpu for {args.gpus} CPU processes"
        )


def member_runs(args: argparse.Namespace) -> list[argparse.Namespace]:
    """The runs of the models run_all trains: `args` itself for one (ensemble.members 1), else one per seed
    seed .. seed+N-1, each with its own weights and submissions folder (`seed<S>` inside the given ones)."""
    cfg = load_config(args.profile, args.overrides)
    count = cfg.ensemble.members
    if count == 1:
        return [args]
    first = cfg.seed if args.seed is None else args.seed
    return [argparse.Namespace(**{**vars(args), "seed": s, "weights": args.weights / f"seed{s}",
                                  "submissions": args.submissions / f"seed{s}"}) for s in range(first, first + count)]


def ensemble_command(args: argparse.Namespace, members: list[argparse.Namespace]) -> list[str]:
    """stages.ensemble of the members' latest submissions into args.submissions, which it marks as latest."""
    cmd = [sys.executable, "-m", "stages.ensemble", *(str(m.submissions) for m in members),
           "--submissions", str(args.submissions), "--latest"]
    return cmd if args.force else [*cmd, "--skip-fresh"]


def stage_command(stage: str, args: argparse.Namespace, data: Path, status_file: Path | None = None) -> list[str]:
    launcher = [sys.executable, "-m"]
    if args.gpus > 1 and stage in PIPELINE:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}", "-m"]
    cmd = [*launcher, f"stages.{stage}", *forward_run_flags(argparse.Namespace(**{**vars(args), "data": data}))]
    if not args.force:
        cmd.append("--skip-fresh")
    if args.resume and stage in TRAINING_STAGES:
        cmd.append("--resume")
    if stage == "infer":
        cmd += ["--submissions", str(args.submissions)]
    if status_file is not None:
        cmd += ["--status-file", str(status_file)]
    return cmd


def synthetic_version(root: Path) -> int | None:
    """Generator version recorded in a synthetic dataset's synth_info.json (1 before versions were recorded);
    None when the folder holds no readable synth_info.json written by the generator."""
    try:
        info = json.loads((root / "synth_info.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(info, dict) or info.get("generator") != "pipeline.data.synth":
        return None
    version = info.get("generator_version", 1)
    return version if isinstance(version, int) else 1


def _generate_default(scale: str) -> None:
    """Write the default synthetic dataset beside DEFAULT_DATA, then swap it in (the old one is removed last)."""
    fresh = DEFAULT_DATA.parent / f".{DEFAULT_DATA.name}.new-{os.getpid()}"
    shutil.rmtree(fresh, ignore_errors=True)
    rc = subprocess.call([sys.executable, "-m", "pipeline.data.synth", "--out", str(fresh), "--scale", scale, "--seed", "0"])
    if rc != 0:
        shutil.rmtree(fresh, ignore_errors=True)
        raise SystemExit(rc)
    old = DEFAULT_DATA.parent / f".{DEFAULT_DATA.name}.old-{os.getpid()}"
    if DEFAULT_DATA.is_dir():
        os.rename(DEFAULT_DATA, old)
    os.rename(fresh, DEFAULT_DATA)
    shutil.rmtree(old, ignore_errors=True)


def ensure_data(args: argparse.Namespace, console: Console) -> Path:
    """The dataset root: --data as given, or the quick synthetic replica (generated once, and again when the
    generator has changed since; only this default folder, never a --data folder)."""
    if args.data is not None:
        if not args.data.is_dir():
            raise UserError(f"--data {args.data}: no such folder (expected an official, NJUST-style or class-folder dataset)")
        return args.data
    if not DEFAULT_DATA.is_dir():
        console.print(f"run_all: no --data given; generating the {args.synth_scale} synthetic dataset into {DEFAULT_DATA}")
        _generate_default(str(args.synth_scale))
        return DEFAULT_DATA
    version = synthetic_version(DEFAULT_DATA)
    if version is not None and version != GENERATOR_VERSION:
        console.print(f"run_all: {DEFAULT_DATA} was made by synthetic generator version {version}, the current one is "
                      f"{GENERATOR_VERSION}: regenerating it ({args.synth_scale} scale)", highlight=False)
        _generate_default(str(args.synth_scale))
    return DEFAULT_DATA


def stage_metric(stage: str, weights: Path, dataset_fingerprint: str | None) -> str:
    """The validation balanced accuracy of the stage's artifact, if it was made from this dataset."""
    artifact = ARTIFACT_OF_STAGE.get(stage)
    if artifact is None:
        return ""
    path = ArtifactPaths.of(weights, artifact).manifest
    if dataset_fingerprint is None or not path.is_file():
        return "-"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return "-"
    if manifest.get("dataset_fingerprint") != dataset_fingerprint:
        return "-"  # left by a run on another dataset: not this run's result
    value = manifest.get("metrics", {}).get("balanced_accuracy")
    return f"{value:.3f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def stage_status(before: tuple[int, str] | None, after: tuple[int, str] | None, reported: dict[str, Any]) -> str:
    """ran / up to date / skipped (why) / no output, from the stage's own report and its output before and after."""
    if reported.get("skipped"):
        return f"skipped ({reported['skipped']})"
    if after is None:
        return "no output"
    return "ran" if after != before else "up to date"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def score_line(score: dict[str, Any]) -> str:
    """One line of a submission's local score; without OOD test chips AUROC (and so the score) is n/a."""
    accuracy, balanced = _number(score.get("accuracy")), _number(score.get("balanced_accuracy"))
    auroc, competition = _number(score.get("auroc")), _number(score.get("competition_score"))
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    if auroc is None:
        return (f"submission: accuracy {fmt(accuracy)}  balanced accuracy {fmt(balanced)}  "
                "AUROC n/a (no out-of-distribution test chips)")
    return (f"submission: accuracy {fmt(accuracy)}  AUROC {fmt(auroc)}  competition score {fmt(competition)}  "
            f"(balanced accuracy {fmt(balanced)})")


def stage_output_stamp(stage: str, args: argparse.Namespace) -> tuple[int, str] | None:
    """What a stage's output looks like now (manifest mtime, or the latest submission), to tell ran from skipped."""
    if stage == ROBUSTNESS_STAGE:
        path = args.weights / f"{ROBUSTNESS_ARTIFACT}.robustness.csv"
        return (path.stat().st_mtime_ns, "") if path.is_file() else None
    if stage == SELECT_OOD_STAGE:
        path = choice_path(args.weights)
        return (path.stat().st_mtime_ns, "") if path.is_file() else None
    if stage == "infer":
        pointer = args.submissions / "latest.txt"
        return (0, pointer.read_text()) if pointer.is_file() else None  # a new run has a new name
    path = ArtifactPaths.of(args.weights, ARTIFACT_OF_STAGE[stage]).manifest
    return (path.stat().st_mtime_ns, "") if path.is_file() else None


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = make_console()
    check_gpus(args)
    data = ensure_data(args, console)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rows: list[tuple[str, float, str, str]] = []
    total_start = time.perf_counter()
    stages, members = selected_stages(args), member_runs(args)
    with tempfile.TemporaryDirectory(prefix="run_all-status-") as status_dir:
        for member in members:
            label = "" if len(members) == 1 else f" (seed {member.seed})"
            for stage in stages:
                rule(console, f"[bold]{stage}{label}")
                status_file = Path(status_dir) / f"{len(rows)}-{stage}.json"
                before = stage_output_stamp(stage, member)
                start = time.perf_counter()
                rc = subprocess.call(stage_command(stage, member, data, status_file), cwd=REPO_ROOT, env=env)
                seconds = time.perf_counter() - start
                reported = read_status(status_file)
                status = f"failed (exit {rc})" if rc != 0 else stage_status(before, stage_output_stamp(stage, member), reported)
                metric = "" if reported.get("skipped") else stage_metric(stage, member.weights, reported.get("dataset_fingerprint"))
                rows.append((stage + label, seconds, status, metric))
                if rc != 0:
                    return stage_failed(console, stage + label, rc, rows, total_start)
    if len(members) > 1 and "infer" in stages:
        rule(console, f"[bold]ensemble of {len(members)} seeds")
        before_runs = submission_folders(args.submissions)
        start = time.perf_counter()
        rc = subprocess.call(ensemble_command(args, members), cwd=REPO_ROOT, env=env)
        status = (f"failed (exit {rc})" if rc != 0 else
                  "ran" if submission_folders(args.submissions) - before_runs else "up to date")
        rows.append(("ensemble", time.perf_counter() - start, status, ""))
        if rc != 0:
            return stage_failed(console, "ensemble", rc, rows, total_start)
    console.print(summary_table(rows, time.perf_counter() - total_start))
    run = latest_submission(args.submissions) if "infer" in stages else None
    if run is not None:
        summary = json.loads((run / "summary.json").read_text())
        score = summary.get("score")
        console.print(score_line(score) if score else "submission: no test labels available, not scored", highlight=False)
        console.print(f"results: {run / 'results.csv'}", highlight=False)
        reports = [run / "report.html"] if len(members) == 1 else [
            m_run / "report.html" for m_run in map(latest_submission, (m.submissions for m in members)) if m_run is not None]
        for report in reports:
            if report.is_file():
                console.print(f"report: {report}", highlight=False)
    return 0


def stage_failed(console: Console, stage: str, rc: int, rows: list[tuple[str, float, str, str]], total_start: float) -> int:
    """The summary of what ran so far and one line on the failed stage; its exit code."""
    console.print(summary_table(rows, time.perf_counter() - total_start))
    console.print(
        f"[red]run_all: stage {stage} failed (exit {rc}); earlier artifacts are kept. "
        f"Fix the cause and rerun the same command: finished stages are skipped.[/]"
    )
    return rc


def summary_table(rows: list[tuple[str, float, str, str]], total_seconds: float) -> Table:
    """One row per stage (status, seconds, validation balanced accuracy of its artifact) and the total."""
    table = Table(title="run_all summary")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("time (s)", justify="right")
    table.add_column("val balanced acc", justify="right")
    for stage, seconds, status, metric in rows:
        table.add_row(stage, status, f"{seconds:.1f}", metric)
    table.add_row("total", "", f"{total_seconds:.1f}", "")
    return table


if __name__ == "__main__":
    raise SystemExit(main())
