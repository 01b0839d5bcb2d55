"""Ensemble of submission runs: several runs' class probabilities (seeds, models) averaged into a new submission.

    python -m stages.ensemble submissions/seed0 submissions/seed1 submissions/seed2 --run ensemble3

Each run is a complete submission folder of the same test chips (results.csv, predictions.csv with its prob_*
columns, as stages.infer writes them). The label is the argmax of the members' mean probability (their
test-time-augmented probabilities, before any cluster voting); the OOD score is the mean of each member's score
standardised over the test chips, since members may use different detectors on different scales (higher = more
in-distribution, as every member's). When the first run holds a truth.csv, the ensemble is scored like a submission.
Writes <submissions>/<run>/{results.csv, predictions.csv, summary.json} and truth.csv / score.json when scored;
an existing folder is never overwritten.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.artifacts import atomic_write_text, code_version
from pipeline.errors import UserError, exit_on_user_error
from pipeline.log import make_console
from pipeline.report import TRUTH_FILE
from pipeline.submission import (
    PREDICTIONS_FILE, RESULTS_FILE, mark_latest, new_run_dir, print_score_report, read_truth, report_json,
    score_submission, write_submission,
)
from pipeline.data.testset import read_csv_table


def read_member(run_dir: Path) -> pd.DataFrame:
    """A finished submission folder's predictions.csv (image_id, score, prob_*), sorted by image_id."""
    run_dir = Path(run_dir)
    if not (run_dir / RESULTS_FILE).is_file():
        raise UserError(f"{run_dir}: not a finished submission folder (no {RESULTS_FILE})")
    table = read_csv_table(run_dir / PREDICTIONS_FILE, "predictions")
    probs = [c for c in table.columns if str(c).startswith("prob_")]
    missing = [c for c in ("image_id", "score") if c not in table.columns]
    if missing or not probs:
        raise UserError(f"{run_dir / PREDICTIONS_FILE} lacks {', '.join(missing) or 'prob_* columns'}: "
                        f"written by another tool or an older version")
    return table.sort_values("image_id", kind="stable").reset_index(drop=True)


def average_members(members: list[pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(results, predictions) of the ensemble of `members` (each as `read_member` returns it)."""
    first = members[0]
    probs = [c for c in first.columns if str(c).startswith("prob_")]
    for k, member in enumerate(members[1:], start=2):
        if not np.array_equal(member["image_id"].to_numpy(), first["image_id"].to_numpy()):
            raise UserError(f"run {k} predicts other test chips than run 1 (image ids differ): an ensemble needs "
                            f"runs of one test set")
        if [c for c in member.columns if str(c).startswith("prob_")] != probs:
            raise UserError(f"run {k} has other classes than run 1 ({len(probs)} prob_* columns in run 1)")
    mean = np.mean([m[probs].to_numpy(np.float64) for m in members], axis=0)
    score = np.mean([_standardised(m["score"].to_numpy(np.float64)) for m in members], axis=0)
    ids = first["image_id"].to_numpy(np.int64)
    results = pd.DataFrame({"image_id": ids, "class_id": mean.argmax(axis=1).astype(np.int64), "score": score})
    predictions = pd.DataFrame({"image_id": ids, **({"path": first["path"]} if "path" in first else {}),
                                "label": results["class_id"], "confidence": mean.max(axis=1), "score": score,
                                **{c: mean[:, i] for i, c in enumerate(probs)}})
    return results, predictions


def _standardised(score: np.ndarray) -> np.ndarray:
    spread = float(score.std())
    return (score - score.mean()) / spread if spread > 0 else np.zeros_like(score)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.ensemble", description=__doc__.strip().splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="submission folders (two or more)")
    parser.add_argument("--submissions", type=Path, default=None,
                        help="where the ensemble's folder goes (default: the first run's parent)")
    parser.add_argument("--run", default=None, help="name of the new folder (default: a timestamp); never overwritten")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        raise UserError("an ensemble needs two or more submission folders")
    members = [read_member(run) for run in args.runs]
    results, predictions = average_members(members)
    num_classes = sum(str(c).startswith("prob_") for c in predictions.columns)
    summary = {"members": [str(run.resolve()) for run in args.runs], "num_test": len(results),
               "label": "argmax of the members' mean probability",
               "score": "mean of the members' OOD scores, each standardised over the test chips",
               "code_version": code_version()}
    first_summary = args.runs[0] / "summary.json"
    names = json.loads(first_summary.read_text()).get("dataset", {}).get("classes") if first_summary.is_file() else None
    submissions = args.submissions or args.runs[0].resolve().parent
    run_dir = new_run_dir(submissions, args.run)
    console = make_console()
    report = None
    if (args.runs[0] / TRUTH_FILE).is_file():
        truth = read_truth(args.runs[0] / TRUTH_FILE, num_classes)
        atomic_write_text(run_dir / TRUTH_FILE, truth.to_csv(index=False))
        report = score_submission(results, truth, num_classes=num_classes)
        summary["score_report"] = {k: report[k] for k in ("accuracy", "auroc", "competition_score", "balanced_accuracy")}
    write_submission(run_dir, results, predictions, summary, expected_ids=results["image_id"], num_classes=num_classes)
    mark_latest(submissions, run_dir)
    console.print(f"[green]ensemble[/]: {len(members)} runs -> {run_dir / RESULTS_FILE} ({len(results)} rows)")
    if report is not None:
        atomic_write_text(run_dir / "score.json", report_json(report))
        print_score_report(report, names if names and len(names) == num_classes else [str(i) for i in range(num_classes)],
                           console)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
