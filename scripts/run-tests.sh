#!/usr/bin/env bash
# The whole suite, as CI runs it: lint, the wheel install check, pytest.
# Services (OpenBao, moto, SeaweedFS, swtpm) join here as the issues that
# need them land; this issue's suite needs none.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
echo "== ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "== wheel install"
scripts/wheel-check.sh
echo "== pytest"
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
