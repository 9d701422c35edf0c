#!/usr/bin/env bash
# One SLURM task = one training process (one GPU). srun starts it on every node; SLURM's own variables
# give each process its place: RANK from SLURM_PROCID, LOCAL_RANK from SLURM_LOCALID.
# Usage (from an sbatch script): srun launch/slurm/task.sh launch/pretrain.py --config X.yaml [k=v ...]
set -euo pipefail
export RANK="$SLURM_PROCID" LOCAL_RANK="$SLURM_LOCALID"
export LOCAL_WORLD_SIZE="${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE%%(*}}"
exec "${PYTHON:-python3}" "$@"
