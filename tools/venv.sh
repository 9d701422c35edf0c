#!/usr/bin/env bash
# Source me: creates ./.venv (or $SCALEGROW_VENV) on first use, installs scalegrow with its pinned
# dependencies (and test extras), builds DeepSpeed's CPU op into it, and puts the venv first on PATH.
# Reinstalls when pyproject.toml changes.
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
