"""Ensemble of submission runs: several runs' class probabilities (seeds, models) averaged into a new submission.

    python -m stages.ensemble submissions/seed0 submissions/seed1 submissions/seed2 --run ensemble3

Each run is a complete submission folder (or a submissions folder: the run its latest.txt names) of the same test
chips and classes (results.csv, predictions.csv with its prob_* columns and summary.json, as stages.infer writes
them). The label is the argmax of the members' mean
probability (their test-time-augmented probabilities, before any cluster voting); the OOD score is the mean of each
member's score standardised over the test chips, since members may use different detectors on different scales
(higher = more in-distribution, as every member's). When the first run holds a truth.csv, the ensemble is scored
like a submission. Everything is checked before the new folder <submissions>/<run>/ is made; it gets results.csv,
predictions.csv, summary.json and, when scored, truth.csv and score.json. No earlier folder is touched; latest.txt
only with --latest (run_all, whose submission the ensemble is). With --skip-fresh an earlier ensemble of the same
member runs (same folders, same predictions.csv bytes) is reused instead of written again.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.table import Table

from pipeline.artifacts import atomic_write_text, code_version, sha256_file
from pipeline.data.testset import integer_column, read_csv_table
from pipeline.errors import UserError, exit_on_user_error
from pipeline.log import make_console
from pipeline.report import TRUTH_FILE
from pipeline.report.build import read_json_object
from pipeline.submission import (
    HEADLINE, PREDICTIONS_FILE, RESULTS_FILE, SUMMARY_FILE, format_figure, latest_submission, mark_latest,
    new_run_dir, read_truth, reuse_fresh_submission, score_submission, validate_submission, write_score,
    write_submission,
)


def resolve_run(path: Path) -> Path:
    """`path`, or, for a submissions folder (no results.csv, a latest.txt), the run its latest.txt names."""
    path = Path(path)
    latest = None if (path / RESULTS_FILE).is_file() else latest_submission(path)
    return path if latest is None else latest


def read_member(run_dir: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """A finished submission folder's predictions (image_id, score, prob_*; sorted by image_id) and summary."""
    run_dir = Path(run_dir)
    if not (run_dir / RESULTS_FILE).is_file():
        raise UserError(f"{run_dir}: not a finished submission folder (no {RESULTS_FILE})")
    table = read_csv_table(run_dir / PREDICTIONS_FILE, "predictions")
    probs = _prob_columns(table)
    missing = [c for c in ("image_id", "score") if c not in table.columns]
    if missing or not probs:
        raise UserError(f"{run_dir / PREDICTIONS_FILE} lacks {', '.join(missing) or 'prob_* columns'}: "
                        f"written by another tool or an older version")
    ids, bad = integer_column(table, "image_id")
    values = table[["score", *probs]].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
    if bad.any() or len(np.unique(ids)) < len(ids) or not np.isfinite(values).all():
        raise UserError(f"{run_dir / PREDICTIONS_FILE}: image ids must be distinct integers and scores and "
                        f"probabilities finite numbers")
    summary = read_json_object(run_dir / SUMMARY_FILE, "summary") if (run_dir / SUMMARY_FILE).is_file() else {}
    table = table.assign(image_id=ids)
    return table.sort_values("image_id", kind="stable").reset_index(drop=True), summary


def member_inputs(runs: list[Path]) -> dict[str, Any]:
    """What an ensemble is made from: each member folder and the digest of its predictions (for --skip-fresh)."""
    return {"ensemble_members": [{"run": str(run.resolve()), "predictions_sha256": sha256_file(run / PREDICTIONS_FILE)}
                                 for run in runs]}


def average_members(members: list[pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(results, predictions) of the ensemble of `members` (predictions as `read_member` returns them)."""
    first = members[0]
    probs = _prob_columns(first)
    for k, member in enumerate(members[1:], start=2):
        if not np.array_equal(member["image_id"].to_numpy(), first["image_id"].to_numpy()):
            raise UserError(f"run {k} predicts other test chips than run 1 (image ids differ): an ensemble needs "
                            f"runs of one test set")
        if _prob_columns(member) != probs:
            raise UserError(f"run {k} has other classes than run 1 ({len(probs)} prob_* columns in run 1)")
    mean = np.mean([m[probs].to_numpy(np.float64) for m in members], axis=0)
    score = np.mean([_standardised(m["score"].to_numpy(np.float64)) for m in members], axis=0)
    ids = first["image_id"].to_numpy(np.int64)
    results = pd.DataFrame({"image_id": ids, "class_id": mean.argmax(axis=1).astype(np.int64), "score": score})
    predictions = pd.DataFrame({"image_id": ids, **({"path": first["path"]} if "path" in first else {}),
                                "label": results["class_id"], "confidence": mean.max(axis=1), "score": score,
                                **{c: mean[:, i] for i, c in enumerate(probs)}})
    return results, predictions


def _prob_columns(table: pd.DataFrame) -> list[str]:
    return [str(c) for c in table.columns if str(c).startswith("prob_")]


def _standardised(score: np.ndarray) -> np.ndarray:
    spread = float(score.std())
    return (score - score.mean()) / spread if spread > 0 else np.zeros_like(score)


def _class_names(summaries: list[dict[str, Any]], runs: list[Path], num_classes: int) -> list[str]:
    """The members' class names (recorded in their summaries), which must agree; numbers when none are recorded."""
    datasets = [s.get("dataset") if isinstance(s.get("dataset"), dict) else {} for s in summaries]
    named = [(run, d.get("classes")) for run, d in zip(runs, datasets)]
    named = [(run, [str(n) for n in names]) for run, names in named if isinstance(names, list) and names]
    for run, names in named[1:]:
        if names != named[0][1]:
            raise UserError(f"{run} has other classes than {named[0][0]}: {', '.join(names)} against "
                            f"{', '.join(named[0][1])}")
    names = named[0][1] if named else []
    return names if len(names) == num_classes else [str(i) for i in range(num_classes)]


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.ensemble", description=__doc__.strip().splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="submission folders (two or more)")
    parser.add_argument("--submissions", type=Path, default=None,
                        help="where the ensemble's folder goes (default: the first run's parent)")
    parser.add_argument("--run", default=None, help="name of the new folder (default: a timestamp); never overwritten")
    parser.add_argument("--latest", action="store_true", help="point <submissions>/latest.txt at the ensemble")
    parser.add_argument("--skip-fresh", action="store_true",
                        help="reuse an earlier ensemble of the same member runs in <submissions> instead of a new one")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        raise UserError("an ensemble needs two or more submission folders")
    runs = [resolve_run(run) for run in args.runs]
    members, summaries = zip(*(read_member(run) for run in runs))
    submissions = args.submissions or runs[0].resolve().parent
    inputs = member_inputs(runs)
    console = make_console()
    if args.skip_fresh and reuse_fresh_submission(submissions, inputs, "ensemble", "member runs", console, mark=args.latest):
        return 0
    results, predictions = average_members(list(members))
    num_classes = len(_prob_columns(predictions))
    names = _class_names(list(summaries), runs, num_classes)
    validate_submission(results, results["image_id"], num_classes)
    truth = read_truth(runs[0] / TRUTH_FILE, num_classes) if (runs[0] / TRUTH_FILE).is_file() else None
    report = None if truth is None else score_submission(results, truth, num_classes=num_classes)
    summary = {"inputs": inputs, "ensemble": {"members": [str(run.resolve()) for run in runs],
                            "label": "argmax of the members' mean probability",
                            "score": "mean of the members' OOD scores, each standardised over the test chips"},
               "dataset": summaries[0].get("dataset"), "num_test": len(results), "code_version": code_version(),
               **({} if report is None else {"score": {k: report[k] for k in HEADLINE}})}
    run_dir = new_run_dir(submissions, args.run)  # all checked: now write
    if truth is not None:
        atomic_write_text(run_dir / TRUTH_FILE, truth.to_csv(index=False))
    write_submission(run_dir, results, predictions, summary, expected_ids=results["image_id"], num_classes=num_classes)
    console.print(f"[green]ensemble[/]: {len(members)} runs -> {run_dir / RESULTS_FILE} ({len(results)} rows)")
    if args.latest:
        mark_latest(submissions, run_dir)
    if report is not None:
        write_score(run_dir, report, names, console)
        print_member_scores(list(summaries), runs, summary["score"], console)
    return 0


def print_member_scores(summaries: list[dict[str, Any]], runs: list[Path], ensemble: dict[str, Any], console: Any) -> None:
    """Each member's headline score (from its summary.json, where it has one) beside the ensemble's."""
    table = Table(title="members and their ensemble")
    table.add_column("run")
    for key in HEADLINE:
        table.add_column(key.replace("_", " "), justify="right")
    for run, summary in zip(runs, summaries):
        score = summary.get("score") if isinstance(summary.get("score"), dict) else {}
        table.add_row(f"{run.parent.name}/{run.name}", *(format_figure(score.get(key)) for key in HEADLINE))
    table.add_row("ensemble", *(format_figure(ensemble.get(key)) for key in HEADLINE))
    console.print(table)


if __name__ == "__main__":
    raise SystemExit(main())
