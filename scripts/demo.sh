#!/usr/bin/env bash
# One caption job end to end: installs, then `imageq demo` (pass --tiny when offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec imageq demo "$@"
