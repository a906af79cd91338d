#!/usr/bin/env bash
# Shared launcher behind scripts/<variant>.sh: one ablation row on N GPUs through dist_train.sh.
#
# usage: bash scripts/_run_variant.sh VARIANT [NGPUS=4] [extra main.py flags ...]
#   env COCO_PATH   dataset root (default data/coco)
#   env TWO_STAGE=1 adds --two_stage --mixed_selection and the tag "two_stage"
#   env TAG=name    output goes to outputs/VARIANT-name (default outputs/VARIANT)
#   env SEED=N      adds --seed N and puts the run in .../seedN (outputs/VARIANT[-TAG]/seedN), so
#                   several seeds of one row sit side by side (scripts/ablation.sh SEEDS="0 1 2")
#   env DIST_TRAIN  launcher to use instead of scripts/dist_train.sh (tests print the command)
# A later --output_dir among the extra flags wins, as every later flag does.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: bash scripts/_run_variant.sh VARIANT [NGPUS=4] [main.py flags ...]" >&2
    exit 2
fi
variant=$1
shift
ngpus=4
# the GPU count is optional: only a bare integer in first position is taken as one
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
    ngpus=$1
    shift
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
config="$root/configs/$variant.yaml"
if [[ ! -f $config ]]; then
    echo "no config for variant '$variant' ($config)" >&2
    exit 2
fi

tag=${TAG:-}
extra=()
if [[ ${TWO_STAGE:-0} == 1 ]]; then
    extra+=(--two_stage --mixed_selection)
    tag=${tag:+$tag-}two_stage
fi
out="outputs/$variant${tag:+-$tag}"
seed=${SEED:-}
if [[ -n $seed ]]; then
    if [[ ! $seed =~ ^[0-9]+$ ]]; then
        echo "SEED must be a non-negative integer, got '$seed'" >&2
        exit 2
    fi
    extra+=(--seed "$seed")
    out="$out/seed$seed"
fi

cd "$root"
exec bash "${DIST_TRAIN:-scripts/dist_train.sh}" "$ngpus" --config "$config" --coco_path "${COCO_PATH:-data/coco}" \
    --output_dir "$out" "${extra[@]}" "$@"
