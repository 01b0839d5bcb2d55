"""Submission folders: `results.csv` validated then written, per-image predictions, summary, local scoring.

`results.csv` has the header `image_id,class_id,score`, one row per test image; `score` is higher
for more in-distribution images. A submission folder is created new for every run and never
overwritten; `results.csv` is written last, so its presence marks a complete submission.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import numbers
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from pipeline.artifacts import atomic_write_text
from pipeline.data.testset import TRUTH_COLUMNS, image_id_from_name, read_truth  # noqa: F401 (one definition, re-exported)
from pipeline.data.testset import brief as _brief
from pipeline.data.testset import data_rows as _rows
from pipeline.data.testset import integer_column as _integer_column
from pipeline.data.testset import read_csv_table as _read_csv
from pipeline.errors import UserError
from pipeline.metrics import auroc, classification_metrics, competition_score, confusion_matrix

RESULTS_COLUMNS = ("image_id", "class_id", "score")
RESULTS_FILE = "results.csv"
PREDICTIONS_FILE = "predictions.csv"
SUMMARY_FILE = "summary.json"
SCORE_FILE = "score.json"
HEADLINE = ("accuracy", "auroc", "competition_score", "balanced_accuracy")  # what summary.json keeps of a score report
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class SubmissionError(UserError):
    """A submission table that the competition server would reject."""


def validate_submission(
    df: pd.DataFrame, expected_ids: Iterable[int] | None, num_classes: int = 10
) -> None:
    """Raise SubmissionError (one line listing every problem) unless `df` is a valid results table.

    Valid: columns exactly image_id,class_id,score; ids integers, each exactly once, and exactly
    `expected_ids` when given; class ids integers in 0..num_classes-1; scores finite numbers.
    """
    columns = [str(c) for c in df.columns]
    if columns != list(RESULTS_COLUMNS):
        raise SubmissionError(
            f"submission columns are {','.join(columns) or '(none)'}: "
            f"expected exactly {','.join(RESULTS_COLUMNS)}"
        )
    problems: list[str] = []
    if len(df) == 0:
        problems.append("no rows")
    ids, bad_ids = _integer_column(df, "image_id")
    bad_ids |= ids < 0
    if bad_ids.any():
        problems.append(f"image_id not a non-negative integer in data row(s) {_rows(bad_ids)}")
    classes, bad_classes = _integer_column(df, "class_id")
    bad_classes |= (classes < 0) | (classes >= num_classes)
    if bad_classes.any():
        problems.append(f"class_id not an integer in 0..{num_classes - 1} in data row(s) {_rows(bad_classes)}")
    scores = pd.to_numeric(df["score"], errors="coerce").astype(np.float64).to_numpy()
    bad_scores = ~np.isfinite(scores) | pd.api.types.is_bool_dtype(df["score"].dtype)
    if bad_scores.any():
        problems.append(f"score not a finite number in data row(s) {_rows(bad_scores)}")
    valid_ids = ids[~bad_ids]
    unique, counts = np.unique(valid_ids, return_counts=True)
    duplicates = unique[counts > 1]
    if duplicates.size:
        problems.append(f"duplicate image_id {_brief(duplicates)}")
    if expected_ids is not None:
        expected = {int(i) for i in expected_ids}
        present = set(valid_ids.tolist())
        missing, extra = sorted(expected - present), sorted(present - expected)
        if missing:
            problems.append(f"missing image_id {_brief(missing)}")
        if extra:
            problems.append(f"unexpected image_id {_brief(extra)}")
    if problems:
        raise SubmissionError("invalid submission: " + "; ".join(problems))


def new_run_dir(submissions_dir: Path, run: str | None = None) -> Path:
    """Create and return a new folder `submissions_dir/<run>` (default name: a YYYYmmdd-HHMMSS time).

    An existing folder is never reused: a named run that exists is a UserError; a timestamp that
    exists gets a suffix -1, -2, ... The folder is created with one mkdir (atomic).
    """
    submissions_dir = Path(submissions_dir)
    if run is not None and (not _RUN_NAME.match(run) or run in (".", "..")):
        raise UserError(f"run name '{run}' is invalid: use letters, digits, '.', '_' and '-' only")
    try:
        submissions_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create submissions folder {submissions_dir}: {err.strerror}") from None
    if run is not None:
        path = submissions_dir / run
        try:
            path.mkdir()
        except FileExistsError:
            raise UserError(
                f"submission folder {path} already exists: choose another run name "
                "(earlier submissions are never overwritten)"
            ) from None
        return path
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(1000):
        path = submissions_dir / (stamp if attempt == 0 else f"{stamp}-{attempt}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"cannot find a free submission folder name for {stamp} in {submissions_dir}")


def find_fresh_submission(submissions: Path, inputs: dict[str, Any]) -> Path | None:
    """An earlier finished submission folder (results.csv written) made from exactly these inputs, if any."""
    key = json.dumps(inputs, sort_keys=True)
    for summary in sorted(submissions.glob("*/summary.json")):
        if not (summary.parent / RESULTS_FILE).is_file():  # summary.json is written before results.csv
            continue
        try:
            if json.dumps(json.loads(summary.read_text()).get("inputs"), sort_keys=True) == key:
                return summary.parent
        except (OSError, json.JSONDecodeError):
            continue
    return None


def reuse_fresh_submission(submissions: Path, inputs: dict[str, Any], name: str, same: str, console: Any,
                           mark: bool = True) -> Path | None:
    """`find_fresh_submission`, said on the console ("<name>: <folder> is up to date (same <same>), skipped") and,
    when `mark`, recorded as the latest run; None when there is none."""
    earlier = find_fresh_submission(submissions, inputs)
    if earlier is not None:
        console.print(f"[green]{name}[/]: {earlier} is up to date (same {same}), skipped")
        if mark:
            mark_latest(submissions, earlier)
    return earlier


def submission_folders(submissions: Path) -> set[str]:
    """Names of the folders in `submissions` (none when it does not exist)."""
    return {p.name for p in Path(submissions).iterdir() if p.is_dir()} if Path(submissions).is_dir() else set()


def mark_latest(submissions: Path, run_dir: Path) -> None:
    """Record the newest (or re-confirmed) submission folder in <submissions>/latest.txt."""
    atomic_write_text(submissions / "latest.txt", run_dir.name + "\n")


def latest_submission(submissions: Path) -> Path | None:
    """The submission folder <submissions>/latest.txt names, if it exists."""
    pointer = submissions / "latest.txt"
    if not pointer.is_file():
        return None
    run = submissions / pointer.read_text().strip()
    return run if run.is_dir() else None


def write_submission(
    run_dir: Path,
    results: pd.DataFrame,
    predictions: pd.DataFrame,
    summary: dict[str, Any],
    expected_ids: Iterable[int] | None,
    num_classes: int = 10,
) -> Path:
    """Validate `results`, then write predictions.csv, summary.json and results.csv (last) atomically.

    Returns the path of results.csv. Ids and class ids are written as integers, scores with the
    shortest repr that reads back to the same float64.
    """
    run_dir = Path(run_dir)
    validate_submission(results, expected_ids, num_classes)
    if "image_id" not in predictions.columns or len(predictions) != len(results):
        raise ValueError("predictions must have an image_id column and one row per result")
    if (run_dir / RESULTS_FILE).exists():
        raise UserError(f"{run_dir / RESULTS_FILE} already exists: earlier submissions are never overwritten")
    table = pd.DataFrame(
        {
            "image_id": pd.to_numeric(results["image_id"]).astype(np.int64).to_numpy(),
            "class_id": pd.to_numeric(results["class_id"]).astype(np.int64).to_numpy(),
            "score": pd.to_numeric(results["score"]).astype(np.float64).to_numpy(),
        }
    )
    atomic_write_text(run_dir / PREDICTIONS_FILE, predictions.to_csv(index=False))
    atomic_write_text(run_dir / SUMMARY_FILE, report_json(summary))
    results_path = run_dir / RESULTS_FILE
    atomic_write_text(results_path, table.to_csv(index=False))
    return results_path


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python numbers, recursively, for strict JSON."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def report_json(report: dict[str, Any]) -> str:
    """Strict JSON text of a report or summary (NaN becomes null)."""
    return json.dumps(_json_safe(report), indent=2, default=str, allow_nan=False) + "\n"


def read_results(path: Path) -> pd.DataFrame:
    """A results.csv as written by `write_submission` (or by hand); UserError if unreadable."""
    return _read_csv(Path(path), "submission")


def score_submission(results: pd.DataFrame, truth: pd.DataFrame, num_classes: int = 10) -> dict[str, Any]:
    """Competition score of `results` against `truth` (class_id -1 = OOD), with the details.

    accuracy: top-1 on in-distribution rows; auroc: of `score` with in-distribution positive (NaN
    when truth has only one kind); competition_score = 0.75·accuracy + 0.25·auroc. Truth ids missing
    from the submission are a UserError; submission ids absent from truth are counted as unscored.
    """
    validate_submission(results, None, num_classes)
    submitted = pd.DataFrame(
        {
            "image_id": pd.to_numeric(results["image_id"]).astype(np.int64),
            "pred": pd.to_numeric(results["class_id"]).astype(np.int64),
            "score": pd.to_numeric(results["score"]).astype(np.float64),
        }
    )
    merged = truth[list(TRUTH_COLUMNS)].merge(submitted, on="image_id", how="left", indicator=True)
    missing = merged.loc[merged["_merge"] != "both", "image_id"].tolist()
    if missing:
        raise UserError(
            f"submission lacks {len(missing)} image(s) of the ground truth: image_id {_brief(missing)}"
        )
    y_true = merged["class_id"].to_numpy(np.int64)
    y_pred = merged["pred"].to_numpy(np.int64)
    is_in = y_true >= 0
    if not is_in.any():
        raise UserError("ground truth has no in-distribution images (all class_id -1): accuracy is undefined")
    cls = classification_metrics(y_true[is_in], y_pred[is_in], num_classes)
    auc = auroc(is_in, merged["score"].to_numpy(np.float64))
    return {
        "competition_score": competition_score(cls["accuracy"], auc),
        "accuracy": cls["accuracy"],
        "auroc": auc,
        "balanced_accuracy": cls["balanced_accuracy"],
        "macro_f1": cls["macro_f1"],
        "per_class_recall": cls["per_class_recall"],
        "per_class_support": np.bincount(y_true[is_in], minlength=num_classes).tolist(),
        "confusion_matrix": confusion_matrix(y_true[is_in], y_pred[is_in], num_classes).tolist(),
        "counts": {
            "scored": int(len(merged)),
            "in_distribution": int(is_in.sum()),
            "ood": int((~is_in).sum()),
            "unscored": int(len(submitted) - submitted["image_id"].isin(truth["image_id"]).sum()),
        },
    }


def format_figure(value: Any, digits: int = 4) -> str:
    """A metric as text with `digits` decimals; "-" when it is missing or not a finite number."""
    return f"{value:.{digits}f}" if isinstance(value, numbers.Real) and math.isfinite(value) else "-"


def print_score_report(report: dict[str, Any], class_names: list[str] | tuple[str, ...], console: Any) -> None:
    """Rich tables: headline numbers, per-class recall, confusion matrix (rows true, columns predicted)."""
    from rich.table import Table

    counts = report["counts"]
    head = Table(title="Local score", show_header=True)
    for col in ("competition score", "accuracy (ID)", "AUROC", "balanced acc", "macro F1", "ID / OOD / unscored"):
        head.add_column(col, justify="right")
    head.add_row(
        format_figure(report["competition_score"]),
        format_figure(report["accuracy"]),
        format_figure(report["auroc"]),
        format_figure(report["balanced_accuracy"]),
        format_figure(report["macro_f1"]),
        f"{counts['in_distribution']} / {counts['ood']} / {counts['unscored']}",
    )
    console.print(head)
    if format_figure(report["auroc"]) == "-":  # NaN in memory, null once read back from score.json
        console.print("AUROC n/a (no out-of-distribution test chips), so no competition score")

    recall = Table(title="Per-class recall (in-distribution)")
    recall.add_column("id", justify="right")
    recall.add_column("class")
    recall.add_column("support", justify="right")
    recall.add_column("recall", justify="right")
    for i, name in enumerate(class_names):
        recall.add_row(str(i), name, str(report["per_class_support"][i]), format_figure(report["per_class_recall"][i], 3))
    console.print(recall)

    matrix = Table(title="Confusion matrix (rows: true, columns: predicted)")
    matrix.add_column("true \\ pred")
    for i in range(len(class_names)):
        matrix.add_column(str(i), justify="right")
    for i, row in enumerate(report["confusion_matrix"]):
        matrix.add_row(f"{i} {class_names[i]}", *(str(v) if v else "." for v in row))
    console.print(matrix)


def write_score(run_dir: Path, report: dict[str, Any], class_names: list[str] | tuple[str, ...], console: Any) -> None:
    """A submission folder's score.json, and the score report printed."""
    atomic_write_text(Path(run_dir) / SCORE_FILE, report_json(report))
    print_score_report(report, class_names, console)
