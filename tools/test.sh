#!/usr/bin/env bash
# Install everything from nothing (venv, pinned packages) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/venv.sh
exec python -m pytest -q -n 2 --durations=15 "$@"
