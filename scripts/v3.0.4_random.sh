#!/usr/bin/env bash
# Ablation row "v3.0.4_random" (a control; see configs/v3.0.4_random.yaml) on COCO minitrain.
# usage: bash scripts/v3.0.4_random.sh [NGPUS=4] [extra main.py flags]
#        TWO_STAGE=1 bash scripts/v3.0.4_random.sh ...   # two-stage + mixed selection, outputs/v3.0.4_random-two_stage
#        env: COCO_PATH (default data/coco), TAG (outputs/v3.0.4_random-TAG), SEED
exec bash "$(dirname "${BASH_SOURCE[0]}")/_run_variant.sh" v3.0.4_random "$@"
