#!/usr/bin/env bash
# Run the whole pipeline: bootstrap .venv, build the synthetic dataset if no --data is given,
# pretrain_eo -> distill_sar -> finetune_head -> infer, then print the score. `bash run_all.sh --help`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=pipeline/bootstrap.sh
source "$ROOT/pipeline/bootstrap.sh"
bootstrap_venv
cd "$ROOT"
exec "$PY" -m pipeline.run_all "$@"
