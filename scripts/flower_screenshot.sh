#!/usr/bin/env bash
# Screenshots of Flower's Tasks and Workers pages with succeeded, failed and canceled
# jobs (docs/img/flower-*.png, shown in docs/operations.md). Offline: a private
# redis-server, a tiny random BLIP and headless Chromium; CI does not run it.
#   apt-get update && apt-get install -y chromium redis-server
#   bash scripts/flower_screenshot.sh [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  echo "chromium not found: apt-get update && apt-get install -y chromium" >&2
  exit 2
fi
. .venv/bin/activate
exec python scripts/flower_screenshot.py "$@"
