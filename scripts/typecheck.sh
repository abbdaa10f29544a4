#!/usr/bin/env bash
# mypy over the public API ([tool.mypy] in pyproject.toml names the modules and the
# settings). The package-dir mapping (`sealstore.loaders` is loaders/ ...) is resolved
# by the editable install's import hook, which mypy does not run: the package is
# first linked as Python sees it into build/api-src (scripts/mkdocs_hooks.py, the
# same tree the API reference is built from), where mypy_path points.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
"$VENV/bin/python" scripts/mkdocs_hooks.py
TIMEFORMAT='mypy: %R s'
time "$VENV/bin/mypy" "$@"
