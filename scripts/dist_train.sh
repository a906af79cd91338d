#!/usr/bin/env bash
# Multi-GPU (and multi-node) training with torchrun.
#
# usage: bash scripts/dist_train.sh NGPUS [main.py flags ...]
#   one node, 4 GPUs:  bash scripts/dist_train.sh 4 --config configs/baseline.yaml --coco_path data/coco
#   two nodes, 8 GPUs each (run on every node, NODE_RANK 0 and 1):
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 bash scripts/dist_train.sh 8 --config ...
# env: NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), PYTHON (python3)
# NGPUS is the number of processes on this node; on a CPU-only machine they use gloo.
set -euo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[0-9]+$ ]]; then
    echo "usage: bash scripts/dist_train.sh NGPUS [main.py flags ...]" >&2
    exit 2
fi
ngpus=$1
shift
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# relative paths among the flags stay relative to the caller's directory: no cd here
exec "${PYTHON:-python3}" -m torch.distributed.run \
    --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$ngpus" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    "$root/main.py" "$@"
