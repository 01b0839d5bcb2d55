"""Test-set names and labels, defined once for dataset discovery and for scoring.

- `image_id_from_name`: the image id of a test file named `<prefix><digits>.<ext>` (`Gotcha16683523.png`
  from 2024 on, `SAR_123.png` / `EO_123.png` in the 2022-2023 editions, `123.png`): the one run of digits
  in the file name's stem. Names with no run of digits or with several are refused.
- `read_truth`: a ground-truth table `image_id,class_id` (class_id -1 = out-of-distribution), such as the
  `test_truth.csv` beside a test folder, validated as a whole (every problem in one line).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from pipeline.errors import UserError

TRUTH_FILE = "test_truth.csv"
TRUTH_COLUMNS = ("image_id", "class_id")
SHOW = 5  # how many offending ids/rows a message lists
_DIGIT_RUN = re.compile(r"[0-9]+")


def image_id_from_name(filename: str | Path) -> int:
    """The one run of digits in a test file name's stem: 'Gotcha00042.png' -> 42, 'SAR_123.png' -> 123."""
    stem = Path(filename).stem
    runs = _DIGIT_RUN.findall(stem)
    if len(runs) == 1:
        return int(runs[0])
    problem = "has no numeric id" if not runs else f"holds {len(runs)} numbers ({', '.join(runs)}), not one id"
    raise UserError(
        f"test image {filename} {problem}: expected <prefix><digits>.<ext> with exactly one run of digits "
        f"(Gotcha123.png, SAR_123.png, 123.png)"
    )


def brief(values: Iterable[Any]) -> str:
    """The first few values, comma-separated, with the total when there are more."""
    values = list(values)
    shown = ", ".join(str(v) for v in values[:SHOW])
    return shown + (f", ... ({len(values)} in all)" if len(values) > SHOW else "")


def data_rows(mask: np.ndarray) -> str:
    """The offending data rows, numbered from 1 (the first line after the header)."""
    return brief(np.flatnonzero(mask) + 1)


def integer_column(df: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    """int64 values of a column and a mask of the rows whose value is not an integer number (set to 0)."""
    col = df[column]
    if pd.api.types.is_bool_dtype(col.dtype):
        return np.zeros(len(col), np.int64), np.ones(len(col), bool)
    if pd.api.types.is_integer_dtype(col.dtype) and not col.isna().any():
        return col.to_numpy(np.int64), np.zeros(len(col), bool)  # exact, even beyond 2**53
    values = pd.to_numeric(col, errors="coerce").astype(np.float64).to_numpy()
    bad = ~np.isfinite(values) | (values != np.round(values)) | (np.abs(values) >= 2.0**63)
    return np.where(bad, 0, values).astype(np.int64), bad


def read_csv_table(path: Path, what: str) -> pd.DataFrame:
    """A CSV file as a DataFrame; UserError (one line) when it is absent or unreadable."""
    if not path.is_file():
        raise UserError(f"{what} file {path} not found")
    try:
        return pd.read_csv(path)
    except OSError as err:
        raise UserError(f"cannot read {what} file {path}: {err.strerror or err}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{what} file {path} is not a readable CSV: {first}") from None


def read_truth(path: Path, num_classes: int = 10) -> pd.DataFrame:
    """Ground truth `image_id,class_id` (class_id -1 = OOD; other columns ignored) as int64 columns."""
    path = Path(path)
    df = read_csv_table(path, "ground-truth")
    missing = [c for c in TRUTH_COLUMNS if c not in df.columns]
    if missing:
        raise UserError(
            f"ground-truth file {path} lacks column(s) {', '.join(missing)}: expected a header image_id,class_id"
        )
    ids, bad_ids = integer_column(df, "image_id")
    bad_ids |= ids < 0
    classes, bad_classes = integer_column(df, "class_id")
    bad_classes |= (classes < -1) | (classes >= num_classes)
    problems = []
    if len(df) == 0:
        problems.append("no rows")
    if bad_ids.any():
        problems.append(f"image_id not a non-negative integer in data row(s) {data_rows(bad_ids)}")
    if bad_classes.any():
        problems.append(f"class_id not an integer in -1..{num_classes - 1} in data row(s) {data_rows(bad_classes)}")
    unique, counts = np.unique(ids[~bad_ids], return_counts=True)
    if (counts > 1).any():
        problems.append(f"duplicate image_id {brief(unique[counts > 1])}")
    if problems:
        raise UserError(f"ground-truth file {path} is malformed: " + "; ".join(problems))
    return pd.DataFrame({"image_id": ids, "class_id": classes})
