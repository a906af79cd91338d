#!/usr/bin/env bash
# Install the requirements and the test tools, then run the whole test suite on the CPU.
#
# usage: bash scripts/test.sh [pytest options ...]     e.g. -m "not slow", -k resume, -x
# env: SKIP_INSTALL=1 to use the packages already installed; PYTHON (python3)
# The exit status is pytest's; "no tests collected" (5) counts as a failure too.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}

if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
    if ! "$python" -m pip install -q -r requirements.txt pytest; then
        echo "warning: pip install failed; running with the packages already installed" >&2
    fi
fi

"$python" -m pytest tests -q "$@"
status=$?
if [[ $status -eq 5 ]]; then
    echo "error: pytest collected no tests" >&2
fi
exit $status
