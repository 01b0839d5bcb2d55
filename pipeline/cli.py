"""The flags shared by every stage, run_all and the benchmarks, declared once.

`add_run_flags` puts them on a parser; `forward_run_flags` turns parsed values back into the argv a
child stage takes, so run_all and the benchmarks forward exactly what they were given.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT / "data" / "synthetic"
DEFAULT_WEIGHTS = REPO_ROOT / "weights"
DEFAULT_SUBMISSIONS = REPO_ROOT / "submissions"


@dataclass(frozen=True)
class Flag:
    flag: str
    kwargs: dict[str, Any]

    @property
    def dest(self) -> str:
        return self.kwargs.get("dest") or self.flag.lstrip("-").replace("-", "_")


RUN_FLAGS: tuple[Flag, ...] = (
    Flag("--data", dict(type=Path, default=None, help="dataset root (official, NJUST-style or generic class-folder layout; default: data/synthetic, the synthetic replica run_all generates)")),
    Flag("--train-dir", dict(default=None, help="generic layout: name of the training split folder")),
    Flag("--test-dir", dict(default=None, help="name of the test folder (official: SAR_Test/test/Test/SAR_VAL; generic: labelled test split)")),
    Flag("--weights", dict(type=Path, default=DEFAULT_WEIGHTS, help="folder of stage artifacts (one run at a time: a stage locks it)")),
    Flag("--profile", dict(default="quick", help="config profile: quick | full | tiny | path/to/profile.yaml (python -m pipeline.config shows it resolved)")),
    Flag("--set", dict(dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key (dotted), repeatable")),
    Flag("--seed", dict(type=int, default=None, help="random seed (overrides the profile's)")),
    Flag("--device", dict(default="auto", help="auto | cpu | cuda | cuda:N")),
    Flag("--holdout-classes", dict(default=None, help="comma-separated classes left out of training and scored as OOD at test")),
    Flag("--cache-dir", dict(type=Path, default=None, help="where packed arrays are cached (default: $EOSAR_CACHE_DIR, else .cache/packs in the project; never inside --data unless given here)")),
    Flag("--skip-bad", dict(action="store_true", help="leave out unreadable images (listed in the cache) instead of stopping")),
)


def add_run_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    for f in RUN_FLAGS:
        parser.add_argument(f.flag, **f.kwargs)
    return parser


def data_root(args: argparse.Namespace) -> Path:
    """--data, or the default synthetic replica when it is not given."""
    return Path(args.data) if args.data is not None else DEFAULT_DATA


def forward_run_flags(args: argparse.Namespace) -> list[str]:
    """The shared flags of `args` as an argv for a stage (defaults left out, --set repeated)."""
    argv: list[str] = []
    for f in RUN_FLAGS:
        value = getattr(args, f.dest, None)
        if f.kwargs.get("action") == "store_true":
            argv += [f.flag] if value else []
        elif f.kwargs.get("action") == "append":
            for item in value or []:
                argv += [f.flag, str(item)]
        elif value is not None:
            argv += [f.flag, str(value)]
    return argv
