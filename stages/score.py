"""Score a submission against a truth table: accuracy (in-distribution), AUROC, competition score.

`python -m stages.score --submission submissions/<run>/results.csv --truth data/synthetic/test_truth.csv`
prints the report (rich tables) and writes it as JSON (default: score.json beside the submission).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.artifacts import atomic_write_text
from pipeline.classes import OFFICIAL_NAMES
from pipeline.errors import UserError, exit_on_user_error
from pipeline.log import make_console
from pipeline.submission import SCORE_FILE, print_score_report, read_results, read_truth, report_json, score_submission


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.score", description=__doc__.strip().splitlines()[0])
    parser.add_argument("--submission", type=Path, required=True, help="results.csv (or its submission folder)")
    parser.add_argument("--truth", type=Path, required=True, help="truth CSV: image_id,class_id (-1 = out-of-distribution)")
    parser.add_argument("--out", type=Path, default=None, help="JSON report path (default: score.json beside the submission)")
    parser.add_argument("--num-classes", type=int, default=len(OFFICIAL_NAMES))
    args = parser.parse_args(argv)
    path = args.submission / "results.csv" if args.submission.is_dir() else args.submission
    if not path.is_file():
        raise UserError(f"submission {path} not found")
    results = read_results(path)
    report = score_submission(results, read_truth(args.truth), num_classes=args.num_classes)
    names = list(OFFICIAL_NAMES) if args.num_classes == len(OFFICIAL_NAMES) else [str(i) for i in range(args.num_classes)]
    print_score_report(report, names, make_console())
    out = args.out or path.with_name(SCORE_FILE)
    atomic_write_text(out, report_json(report))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
