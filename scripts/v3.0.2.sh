#!/usr/bin/env bash
# Ablation row "v3.0.2" (see configs/v3.0.2.yaml) on COCO minitrain.
# usage: bash scripts/v3.0.2.sh [NGPUS=4] [extra main.py flags]
#        TWO_STAGE=1 bash scripts/v3.0.2.sh ...   # two-stage + mixed selection, outputs/v3.0.2-two_stage
#        env: COCO_PATH (default data/coco), TAG (outputs/v3.0.2-TAG)
exec bash "$(dirname "${BASH_SOURCE[0]}")/_run_variant.sh" v3.0.2 "$@"
