#!/usr/bin/env bash
# Ablation row "cascade" (see configs/cascade.yaml) on COCO minitrain.
# usage: bash scripts/cascade.sh [NGPUS=4] [extra main.py flags]
#        TWO_STAGE=1 bash scripts/cascade.sh ...   # two-stage + mixed selection, outputs/cascade-two_stage
#        env: COCO_PATH (default data/coco), TAG (outputs/cascade-TAG)
exec bash "$(dirname "${BASH_SOURCE[0]}")/_run_variant.sh" cascade "$@"
