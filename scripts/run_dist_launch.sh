#!/usr/bin/env bash
# Multi-GPU training with the older launcher, python -m torch.distributed.launch
# (for clusters whose tooling expects it; scripts/dist_train.sh uses torchrun).
# The launcher passes --local-rank=N to main.py (accepted, as is --local_rank) and also
# sets RANK / WORLD_SIZE / LOCAL_RANK, which main.py reads.
#
# usage: bash scripts/run_dist_launch.sh NGPUS [main.py flags ...]
# env: NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), PYTHON (python3)
set -euo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ ]]; then
    echo "usage: bash scripts/run_dist_launch.sh NGPUS [main.py flags ...]" >&2
    exit 2
fi
ngpus=$1
shift
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# the launcher's deprecation notice is expected; torchrun is the modern equivalent
exec "${PYTHON:-python3}" -W ignore::FutureWarning -m torch.distributed.launch \
    --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$ngpus" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    "$root/main.py" "$@"
