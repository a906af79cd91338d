#!/usr/bin/env bash
# The whole ablation table, one run after another: every variant without and with two-stage
# (+ mixed selection), once per seed, then a summary table and AP plot in outputs/ablation.{md,png}
# (mean +- std over seeds and the paired difference of each variant to the `cascade` control).
#
# usage: bash scripts/ablation.sh [NGPUS=4] [extra main.py flags for every run]
#   env VARIANTS="baseline cascade ..."  rows to run (default: all six)
#   env CONTROLS=1                       also the controls of design section 10 after the rows: the oracle
#                                        sources v3.0.4_gt, v3.0.4_gt_distance (references from ground-truth
#                                        boxes; never detectors) and the random ranking v3.0.4_random
#   env STAGE_MODES="single two"         which forms to run (default: both)
#   env SEEDS="0 1 2"                    one run per seed, in outputs/VARIANT[-TAG]/seedN with --seed N
#                                        (default: one run with the config's seed in outputs/VARIANT[-TAG])
#   env COCO_PATH, TAG, DIST_TRAIN       passed on to scripts/_run_variant.sh; PYTHON (python3)
# A failed run is reported and skipped so one crash does not cost the rest of the table.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
variants=(${VARIANTS:-baseline cascade v3.0.1 v3.0.2 v3.0.3 v3.0.4})
if [[ ${CONTROLS:-0} == 1 ]]; then
    variants+=(v3.0.4_gt v3.0.4_gt_distance v3.0.4_random)
fi
modes=(${STAGE_MODES:-single two})
# an empty entry stands for "no --seed": the single run of the config's own seed, as before SEEDS existed
seeds=(${SEEDS:-})
[[ ${#seeds[@]} -eq 0 ]] && seeds=("")

dirs=()
failed=()
for mode in "${modes[@]}"; do
    for variant in "${variants[@]}"; do
        two=0
        [[ $mode == two ]] && two=1
        tag=${TAG:-}
        [[ $two == 1 ]] && tag=${tag:+$tag-}two_stage
        for seed in "${seeds[@]}"; do
            echo "=== $variant ($mode-stage${seed:+, seed $seed}) ==="
            if TWO_STAGE=$two SEED=$seed bash scripts/_run_variant.sh "$variant" "$@"; then
                :
            else
                failed+=("$variant/$mode${seed:+/seed$seed}")
            fi
            dirs+=("outputs/$variant${tag:+-$tag}${seed:+/seed$seed}")
        done
    done
done

"${PYTHON:-python3}" scripts/summarize.py "${dirs[@]}" --control cascade --out outputs/ablation.md \
    --plot outputs/ablation.png
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "failed runs: ${failed[*]}" >&2
    exit 1
fi
