#!/usr/bin/env bash
# Install everything from nothing (Debian's SLURM daemons, a venv with the pinned packages) and run
# the whole test suite: unit tests, multi-process megatron-core checks, DeepSpeed runs, a SLURM job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/system_deps.sh
source tools/venv.sh
exec python -m pytest -q -n 2 --dist loadfile --durations=15 "$@"
