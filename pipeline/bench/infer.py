"""Benchmark: the inference stage's options on one trained model (weights/sar_final).

Runs `stages.infer` once per variant (TTA on/off, 8 views, cluster voting on/off, energy / MSP /
max-logit / KNN / Mahalanobis / ViM OOD score) into a temporary submissions folder and prints
accuracy, AUROC, competition score, labels changed by voting and images/s. Needs test labels (the synthetic test_truth.csv or a
labelled generic test split).

    python -m pipeline.bench.infer --data data/synthetic --weights weights --profile quick
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.cli import REPO_ROOT, add_run_flags, forward_run_flags
from pipeline.tta import VIEW_NAMES

VARIANTS: dict[str, list[str]] = {
    "profile (TTA + voting, energy)": [],
    "no TTA": ["infer.tta.views=[identity]"],
    "no voting": ["infer.cluster.enabled=false"],
    "no TTA, no voting": ["infer.tta.views=[identity]", "infer.cluster.enabled=false"],
    f"{len(VIEW_NAMES)} views": [f"infer.tta.views=[{', '.join(VIEW_NAMES)}]"],
    "OOD: msp": ["infer.ood.method=msp"],
    "OOD: maxlogit": ["infer.ood.method=maxlogit"],
    "OOD: knn": ["infer.ood.method=knn"],
    "OOD: mahalanobis": ["infer.ood.method=mahalanobis"],
    "OOD: vim": ["infer.ood.method=vim"],
}


def main(argv: list[str] | None = None) -> None:
    parser = add_run_flags(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    base = forward_run_flags(args)
    table = Table(title=f"inference variants ({args.data}, profile {args.profile})")
    for col in ("variant", "views", "img/s", "accuracy", "AUROC", "competition", "votes changed"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    with tempfile.TemporaryDirectory() as subs:
        for i, (name, overrides) in enumerate(VARIANTS.items()):
            sets = [x for o in overrides for x in ("--set", o)]
            cmd = [sys.executable, "-m", "stages.infer", *base, *sets, "--submissions", subs, "--run", f"v{i}"]
            subprocess.run(cmd, cwd=REPO_ROOT, check=True, stdout=subprocess.DEVNULL)
            summary = json.loads((Path(subs) / f"v{i}" / "summary.json").read_text())
            score = summary.get("score") or {}
            table.add_row(
                name, str(summary["views"]), f"{summary['images_per_s']:,.0f}",
                f"{score.get('accuracy', float('nan')):.4f}", f"{score.get('auroc') or float('nan'):.4f}",
                f"{score.get('competition_score') or float('nan'):.4f}", str(summary["votes_changed"]),
            )
    Console().print(table)


if __name__ == "__main__":
    main()
