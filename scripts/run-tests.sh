#!/usr/bin/env bash
# The whole suite, as CI runs it: lint, the type check, the wheel install check, then pytest
# against the real services (OpenBao, moto, SeaweedFS, swtpm), which are
# started here and stopped on the way out -- also when a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
echo "== ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "== mypy"
VENV="$VENV" scripts/typecheck.sh
echo "== wheel install"
scripts/wheel-check.sh
echo "== services"
scripts/services.sh install
trap 'scripts/services.sh stop' EXIT
scripts/services.sh start
eval "$(scripts/services.sh env)"
echo "== pytest"
# The 15 slowest tests are printed at the end: the suite must stay under 30 minutes.
"$VENV/bin/python" -m pytest -q -p no:cacheprovider --durations=15 "$@"
