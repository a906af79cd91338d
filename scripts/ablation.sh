#!/usr/bin/env bash
# The whole ablation table, one run after another: every variant without and with two-stage
# (+ mixed selection), then a summary table and AP plot in outputs/ablation.{md,png}.
#
# usage: bash scripts/ablation.sh [NGPUS=4] [extra main.py flags for every run]
#   env VARIANTS="baseline cascade ..."  rows to run (default: all six)
#   env STAGE_MODES="single two"         which forms to run (default: both)
#   env COCO_PATH, TAG, DIST_TRAIN       passed on to scripts/_run_variant.sh; PYTHON (python3)
# A failed run is reported and skipped so one crash does not cost the rest of the table.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
variants=(${VARIANTS:-baseline cascade v3.0.1 v3.0.2 v3.0.3 v3.0.4})
modes=(${STAGE_MODES:-single two})

dirs=()
failed=()
for mode in "${modes[@]}"; do
    for variant in "${variants[@]}"; do
        two=0
        [[ $mode == two ]] && two=1
        tag=${TAG:-}
        [[ $two == 1 ]] && tag=${tag:+$tag-}two_stage
        echo "=== $variant ($mode-stage) ==="
        if TWO_STAGE=$two bash scripts/_run_variant.sh "$variant" "$@"; then
            :
        else
            failed+=("$variant/$mode")
        fi
        dirs+=("outputs/$variant${tag:+-$tag}")
    done
done

"${PYTHON:-python3}" scripts/summarize.py "${dirs[@]}" --out outputs/ablation.md --plot outputs/ablation.png
if [[ ${#failed[@]} -gt 0 ]]; then
    echo "failed runs: ${failed[*]}" >&2
    exit 1
fi
