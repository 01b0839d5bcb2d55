# Sourced by run_all.sh and tests/run.sh: make sure .venv exists and matches requirements.txt.
# Reuses .venv when requirements.txt is unchanged since the last install (a stamp holds its sha256).
# Exports PY (the venv's python) and puts the repo root on PYTHONPATH.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
STAMP="$VENV/.requirements.sha256"

_req_sha() { sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1; }

bootstrap_venv() {
  local want
  want="$(_req_sha)"
  if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    :
  else
    local base="${PYTHON:-}"
    if [ -z "$base" ]; then
      for cand in python3.11 python3; do
        if command -v "$cand" >/dev/null 2>&1; then base="$cand"; break; fi
      done
    fi
    if [ -z "$base" ]; then
      echo "error: no python3 found; install Python 3.11 or set PYTHON=/path/to/python3" >&2
      return 2
    fi
    if [ ! -x "$VENV/bin/python" ]; then
      echo "bootstrap: creating $VENV with $base" >&2
      "$base" -m venv "$VENV" || { echo "error: could not create $VENV" >&2; return 2; }
    fi
    echo "bootstrap: installing requirements.txt into $VENV (first run takes a few minutes)" >&2
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q -r "$ROOT/requirements.txt" \
      || { echo "error: pip install -r requirements.txt failed (see above)" >&2; return 2; }
    echo "$want" > "$STAMP"
  fi
  PY="$VENV/bin/python"
  export PY
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
}
