"""`python -m pipeline.bench data|train|infer|kmeans|models|augment [flags]`: run one benchmark."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ("data", "train", "infer", "kmeans", "models", "augment")


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in BENCHMARKS:
        print(f"usage: python -m pipeline.bench {{{'|'.join(BENCHMARKS)}}} [flags]  (--help after the name for its flags)")
        raise SystemExit(2)
    importlib.import_module(f"pipeline.bench.{sys.argv[1]}").main(sys.argv[2:])


if __name__ == "__main__":
    main()
