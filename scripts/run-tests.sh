#!/usr/bin/env bash
# The whole suite, as CI runs it: lint, the type check, the wheel install check, then pytest
# against the real services (OpenBao, moto, SeaweedFS, swtpm), which are
# started here and stopped on the way out -- also when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
# Each step prints the seconds since the start: the whole of `make test` must stay under 30 minutes.
step() { echo "== $1 (at ${SECONDS} s)"; }
step ruff
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
step mypy
VENV="$VENV" scripts/typecheck.sh
step "wheel install"
scripts/wheel-check.sh
step services
scripts/services.sh install
trap 'scripts/services.sh stop' EXIT
scripts/services.sh start
eval "$(scripts/services.sh env)"
step pytest
# Two workers (pytest-xdist): much of the suite waits on services and subprocesses. Each
# test file runs in one worker (--dist loadfile), so its module and session fixtures (the
# vLLM server, the Ray cluster) start once; each worker after the first has a swtpm of its
# own (tests/services.py); the slowest files go first (tests/conftest.py, SLOW_FIRST).
# SEALSTORE_TEST_WORKERS=0 runs the suite in this one process.
# The 15 slowest tests are printed at the end.
workers=${SEALSTORE_TEST_WORKERS:-2}
xdist=()
[ "$workers" = 0 ] || xdist=(-n "$workers" --dist loadfile --no-loadscope-reorder)
"$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=15 "${xdist[@]}" "$@"
step done
