#!/usr/bin/env bash
# Source me: creates ./.venv (or $SCALEGROW_VENV) on first use, installs scalegrow with its pinned
# dependencies (and test extras), and puts the venv first on PATH. Reinstalls when pyproject.toml changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SCALEGROW_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtual environment $VENV" >&2
  python3 -m venv "$VENV"
fi
STAMP="$VENV/.scalegrow-installed"
WANT="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "installing scalegrow and its dependencies into $VENV (first time: ~2 minutes)" >&2
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test]" 2>&1 \
    | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import scalegrow, torch, megatron.core, deepspeed" >/dev/null 2>&1 \
    || { echo "install failed: cannot import scalegrow's dependencies" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
