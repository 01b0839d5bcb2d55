"""Coarse transfer check: predicted class shares on real chips beside those on synthetic test chips.

    python -m pipeline.data.transfer submissions/real2022 submissions/<synthetic run>
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.classes import NUM_OFFICIAL_CLASSES, OFFICIAL_NAMES
from pipeline.errors import UserError, exit_on_user_error
from pipeline.log import make_console


def class_shares(run: Path) -> np.ndarray:
    """Share of each official class among the predictions of a submission folder (or its results.csv)."""
    path = Path(run) / "results.csv" if Path(run).is_dir() else Path(run)
    try:
        labels = pd.read_csv(path)["class_id"].to_numpy()
    except (OSError, KeyError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise UserError(f"cannot read the predictions of {path}: {err}") from None
    if len(labels) == 0:
        raise UserError(f"{path} holds no predictions")
    return np.bincount(labels.astype(np.int64), minlength=NUM_OFFICIAL_CLASSES)[:NUM_OFFICIAL_CLASSES] / len(labels)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m pipeline.data.transfer", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="submission folders (or results.csv files) to put side by side")
    args = p.parse_args(argv)
    from rich.table import Table

    shares = [class_shares(r) for r in args.runs]
    table = Table(title="predicted class shares")
    table.add_column("class")
    for run in args.runs:
        table.add_column(run.name if run.is_dir() else str(run), justify="right")
    for c, name in enumerate(OFFICIAL_NAMES):
        table.add_row(f"{c} {name}", *(f"{s[c]:.1%}" for s in shares))
    make_console().print(table)


if __name__ == "__main__":
    main()
