#!/usr/bin/env bash
# The test suite (about 5 minutes on 2 cores). `--slow` runs the slow tests instead.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
if [ "${1:-}" = "--slow" ]; then shift; exec .venv/bin/python -m pytest -m slow "$@"; fi
exec .venv/bin/python -m pytest "$@"
