#!/usr/bin/env bash
# Ablation row "v3.0.1" (see configs/v3.0.1.yaml) on COCO minitrain.
# usage: bash scripts/v3.0.1.sh [NGPUS=4] [extra main.py flags]
#        TWO_STAGE=1 bash scripts/v3.0.1.sh ...   # two-stage + mixed selection, outputs/v3.0.1-two_stage
#        env: COCO_PATH (default data/coco), TAG (outputs/v3.0.1-TAG)
exec bash "$(dirname "${BASH_SOURCE[0]}")/_run_variant.sh" v3.0.1 "$@"
