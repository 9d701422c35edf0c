#!/usr/bin/env bash
# Source me: creates ./.venv (or $SCALEGROW_VENV) on first use with a Python from 3.10 to 3.13,
# installs scalegrow and its test extras into it under the constraints of the tested stack for that
# Python (constraints/), builds DeepSpeed's CPU op into it, and puts the venv first on PATH.
# Reinstalls when pyproject.toml or the constraints file changes.
#   SCALEGROW_PYTHON=python3.12   the interpreter (default: python3 if it is 3.10-3.13, else the first
#                                 of python3.12, python3.11, python3.13, python3.10 found, pyenv's too)
#   SCALEGROW_CONSTRAINTS=none    install by pyproject's ranges only (keeps what an environment holds)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SCALEGROW_VENV:-$ROOT/.venv}"

_minor() { "$1" -c 'import sys; print(sys.version_info[1] if sys.version_info[0] == 3 else 0)' 2>/dev/null; }
_supported() { local m; m="$(_minor "$1")" && [ -n "$m" ] && [ "$m" -ge 10 ] && [ "$m" -le 13 ]; }
_find_python() {
  if [ -n "${SCALEGROW_PYTHON:-}" ]; then
    _supported "$SCALEGROW_PYTHON" || { echo "SCALEGROW_PYTHON=$SCALEGROW_PYTHON is not Python 3.10-3.13" >&2; return 1; }
    command -v "$SCALEGROW_PYTHON"; return
  fi
  local c
  for c in python3 python3.12 python3.11 python3.13 python3.10 \
           "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2310].*/bin/python3; do
    if command -v "$c" >/dev/null 2>&1 && _supported "$c"; then command -v "$c"; return; fi
  done
  echo "no Python 3.10-3.13 found (set SCALEGROW_PYTHON)" >&2; return 1
}

PY="$(_find_python)"
MINOR="$(_minor "$PY")"
if [ "$MINOR" -ge 12 ]; then STACK=py3.12-newest; else STACK=py3.11-oldest; fi
CONSTRAINTS="$ROOT/constraints/$STACK.txt"
[ "${SCALEGROW_CONSTRAINTS:-}" = none ] && CONSTRAINTS=/dev/null
if [ -x "$VENV/bin/python" ] && [ "$(_minor "$VENV/bin/python")" != "$MINOR" ]; then
  echo "recreating $VENV for Python 3.$MINOR" >&2
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtual environment $VENV with $PY (Python 3.$MINOR)" >&2
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.scalegrow-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "installing scalegrow into $VENV, stack $(basename "$CONSTRAINTS" .txt) (first time: minutes)" >&2
  # PIP_CONSTRAINT replaces any constraint file from pip's own configuration: the stack's pins rule
  export PIP_CONSTRAINT="$CONSTRAINTS" PIP_DISABLE_PIP_VERSION_CHECK=1
  "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]" 2>&1 | grep -v "^WARNING: Location" || true
  unset PIP_CONSTRAINT
  "$VENV/bin/python" -c "import scalegrow, torch, megatron.core, deepspeed" >/dev/null 2>&1 \
    || { echo "install failed: cannot import scalegrow's dependencies" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi
# DeepSpeed compiles its CPU shared-memory all-reduce on first use (~1 minute). Build it now, inside
# this venv (scalegrow's launchers look for it there), so the first training run starts at once.
EXT="$VENV/torch_extensions"
if [ ! -f "$EXT/.scalegrow-built" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "building DeepSpeed's CPU communication op into $EXT (about a minute, once)" >&2
  if PATH="$VENV/bin:$PATH" TORCH_EXTENSIONS_DIR="$EXT" DS_ACCELERATOR=cpu "$VENV/bin/python" -c \
      "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()" >/dev/null 2>&1; then
    touch "$EXT/.scalegrow-built"
  else
    echo "note: could not prebuild it (no C++ compiler?); DeepSpeed will try on the first training run" >&2
  fi
fi
export PATH="$VENV/bin:$PATH"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
