#!/usr/bin/env bash
# The test command: installs what is missing, then lint, types, import rules and every
# test tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
mypy
# The import directions of docs/design.md §1 (contracts in pyproject.toml). No cache
# folder: a full check takes seconds.
lint-imports --no-cache
python -m pytest -q "$@"
