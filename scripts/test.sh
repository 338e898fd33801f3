#!/usr/bin/env bash
# The test suite (see README for its time on 2 cores). `--slow` runs the slow tests instead.
# One intra-op thread per process unless OMP_NUM_THREADS says otherwise: the tests use tiny models
# and spawn processes of their own, and extra threads only fight for the cores.
set -euo pipefail
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-${OMP_NUM_THREADS:-1}}"
cd "$(dirname "$0")/.."
source scripts/setup.sh
if [ "${1:-}" = "--slow" ]; then shift; exec .venv/bin/python -m pytest -m slow "$@"; fi
exec .venv/bin/python -m pytest "$@"
