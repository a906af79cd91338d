#!/usr/bin/env bash
# The CPU demo: install the requirements, train configs/demo.yaml on the synthetic dataset
# (generated under data/synthetic on first use), evaluate the final checkpoint and print the
# COCO AP table.
#
# usage: bash scripts/demo.sh [extra main.py flags ...]
# env: SKIP_INSTALL=1 to use the packages already installed; OUTPUT_DIR (outputs/demo); PYTHON (python3)
# Running it again continues from the last checkpoint in OUTPUT_DIR (--auto_resume).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
out=${OUTPUT_DIR:-outputs/demo}

if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
    echo "== installing requirements"
    "$python" -m pip install -q -r requirements.txt
fi

echo "== training configs/demo.yaml -> $out"
start=$(date +%s)
"$python" main.py --config configs/demo.yaml --output_dir "$out" --auto_resume "$@"
echo "== training took $(( $(date +%s) - start )) s"

echo "== evaluating $out/checkpoint.pth"
"$python" main.py --config configs/demo.yaml --eval --resume "$out/checkpoint.pth" --output_dir "$out/eval" "$@"
echo "== AP50 per epoch (log: $out/log.jsonl)"
"$python" - "$out/log.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("type") == "epoch" and "test_AP50" in r:
        print(f"epoch {r['epoch']:3d}  AP {r['test_AP']:.3f}  AP50 {r['test_AP50']:.3f}  ({r['epoch_time']:.0f} s)")
PY
