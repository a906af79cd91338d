#!/usr/bin/env bash
# Training on a SLURM cluster: one task per GPU, started by srun.
#
# usage: bash scripts/slurm_train.sh PARTITION JOB_NAME GPUS [main.py flags ...]
#   e.g. bash scripts/slurm_train.sh gpu cascade 16 --config configs/cascade.yaml --coco_path /data/coco
# env: GPUS_PER_NODE (8, or GPUS if fewer), CPUS_PER_TASK (4), MASTER_PORT (29500),
#      SRUN_ARGS (extra srun options, e.g. "--time=24:00:00"), PYTHON (python3)
# main.py reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; every task sets MASTER_ADDR to
# the first node of the allocation.
set -euo pipefail

if [[ $# -lt 3 || ! $3 =~ ^[0-9]+$ ]]; then
    echo "usage: bash scripts/slurm_train.sh PARTITION JOB_NAME GPUS [main.py flags ...]" >&2
    exit 2
fi
partition=$1
job_name=$2
gpus=$3
shift 3
gpus_per_node=${GPUS_PER_NODE:-$(( gpus < 8 ? gpus : 8 ))}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export MASTER_PORT=${MASTER_PORT:-29500}

# SRUN_ARGS is split on spaces on purpose (several options in one variable)
# shellcheck disable=SC2086
srun -p "$partition" --job-name="$job_name" --gres=gpu:"$gpus_per_node" --ntasks="$gpus" \
    --ntasks-per-node="$gpus_per_node" --cpus-per-task="${CPUS_PER_TASK:-4}" --kill-on-bad-exit=1 \
    ${SRUN_ARGS:-} \
    bash -c 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1); exec "$0" "$@"' \
    "${PYTHON:-python3}" "$root/main.py" "$@"
