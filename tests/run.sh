#!/usr/bin/env bash
# Bootstrap .venv (if missing or requirements changed), then run the test suite.
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k layout -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=../pipeline/bootstrap.sh
source "$ROOT/pipeline/bootstrap.sh"
bootstrap_venv
cd "$ROOT"
# Two workers (pytest-xdist), whole files per worker so module fixtures are built once; one torch thread per
# process, so the two workers and the stage subprocesses they start do not oversubscribe the cores.
# `bash tests/run.sh -n 0` runs in one process.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PY" -m pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-2}" --dist loadfile "$@" tests
