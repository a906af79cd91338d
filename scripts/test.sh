#!/usr/bin/env bash
# Install the requirements and the test tools (requirements-test.txt) at exactly the versions the
# suite last ran with (constraints.txt), then run the whole test suite on the CPU.
#
# usage: bash scripts/test.sh [pytest options ...]     e.g. -m "not slow", -k resume, -x
# env: SKIP_INSTALL=1 to use the packages already installed (e.g. a cluster's own torch, which the
#      constraints would replace); PYTHON (python3)
# The exit status is pytest's; a failed install stops here (status 3), and "no tests collected"
# (pytest's 5) counts as a failure too.
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}

if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
    # a failed install must not fall back to whatever happens to be installed: that is how a
    # missing or unpinned requirement hides until a user's first try
    if ! "$python" -m pip install -q -c constraints.txt -r requirements-test.txt; then
        echo "error: pip install -c constraints.txt -r requirements-test.txt failed" \
             "(SKIP_INSTALL=1 runs with the installed packages)" >&2
        exit 3
    fi
fi
"$python" -m pytest --version

"$python" -m pytest tests -q "$@"
status=$?
if [[ $status -eq 5 ]]; then
    echo "error: pytest collected no tests" >&2
fi
exit $status
