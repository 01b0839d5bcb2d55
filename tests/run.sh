#!/usr/bin/env bash
# Bootstrap .venv (if missing or requirements changed), then run the test suite.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k layout -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=../pipeline/bootstrap.sh
source "$ROOT/pipeline/bootstrap.sh"
bootstrap_venv
cd "$ROOT"
exec "$PY" -m pytest -q -p no:cacheprovider "$@" tests
