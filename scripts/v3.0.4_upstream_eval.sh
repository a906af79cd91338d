#!/usr/bin/env bash
# Ablation row "v3.0.4_upstream_eval" (see configs/v3.0.4_upstream_eval.yaml) on COCO minitrain.
# usage: bash scripts/v3.0.4_upstream_eval.sh [NGPUS=4] [extra main.py flags]
#        TWO_STAGE=1 bash scripts/v3.0.4_upstream_eval.sh ...   # two-stage + mixed selection
#        env: COCO_PATH (default data/coco), TAG (outputs/v3.0.4_upstream_eval-TAG)
exec bash "$(dirname "${BASH_SOURCE[0]}")/_run_variant.sh" v3.0.4_upstream_eval "$@"
