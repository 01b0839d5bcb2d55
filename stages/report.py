"""Rebuild a run's report.html (+ plots/), or compare two runs side by side.

`python -m stages.report --submission submissions/<run>` rewrites submissions/<run>/report.html and its
plots/ from the run folder and the artifacts it used (infer writes the same report at the end of a run);
`python -m stages.report --compare RUN_A RUN_B` writes compare-<A>-vs-<B>.html beside RUN_A (or --out):
scores, per-class recall difference, OOD score histograms overlaid, config differences.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import load_config
from pipeline.errors import UserError, exit_on_user_error
from pipeline.report import build_report, compare_runs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stages.report", description=__doc__.strip().splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--submission", type=Path, help="submission folder to (re)build the report of")
    what.add_argument("--compare", type=Path, nargs=2, metavar=("RUN_A", "RUN_B"), help="two submission folders to compare")
    parser.add_argument("--weights", type=Path, default=None, help="weights folder of the run's artifacts (default: the one infer recorded)")
    parser.add_argument("--ablation", type=Path, default=None, help="ablation table to include (default: ablation.csv in the run folder, if any)")
    parser.add_argument("--robustness", type=Path, default=None, help="robustness table to include (default: robustness.csv in the run folder, if any)")
    parser.add_argument("--out", type=Path, default=None, help="--compare: path of the HTML page (default: compare-<A>-vs-<B>.html beside RUN_A)")
    parser.add_argument("--profile", default="quick", help="profile whose report section (gallery_size, dpi) is used")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. report.dpi=150")
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = load_config(args.profile, args.overrides).report
    if args.compare:
        if args.weights or args.ablation or args.robustness:
            raise UserError("--weights, --ablation and --robustness belong to --submission, not --compare")
        path = compare_runs(args.compare[0], args.compare[1], args.out, settings)
    else:
        if args.out is not None:
            raise UserError("--out belongs to --compare: the report of a run is always <run>/report.html")
        path = build_report(args.submission, settings, weights=args.weights, ablation=args.ablation, robustness=args.robustness)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
