#!/usr/bin/env bash
# The test command: installs what is missing, then lint, types and every test tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
mypy
python -m pytest -q "$@"
