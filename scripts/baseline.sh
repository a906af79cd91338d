#!/usr/bin/env bash
# Ablation row "baseline" (see configs/baseline.yaml) on COCO minitrain.
# usage: bash scripts/baseline.sh [NGPUS=4] [extra main.py flags]
#        TWO_STAGE=1 bash scripts/baseline.sh ...   # two-stage + mixed selection, outputs/baseline-two_stage
#        env: COCO_PATH (default data/coco), TAG (outputs/baseline-TAG)
exec bash "$(dirname "${BASH_SOURCE[0]}")/_run_variant.sh" baseline "$@"
