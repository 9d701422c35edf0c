# Sourced by the sbatch scripts: the rendezvous every rank needs, derived from SLURM's environment.
# MASTER_ADDR: the first node of the allocation. MASTER_PORT: fixed per job (override by exporting it).
export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export WORLD_SIZE="$SLURM_NTASKS"
echo "scalegrow: $SLURM_NTASKS ranks on $SLURM_JOB_NUM_NODES node(s), rendezvous $MASTER_ADDR:$MASTER_PORT"
