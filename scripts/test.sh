#!/usr/bin/env bash
# The test suite (see README for its time on 2 cores). `--slow` runs the slow tests instead.
# One intra-op thread per process unless OMP_NUM_THREADS says otherwise: the tests use tiny models
# and spawn processes of their own, and extra threads only fight for the cores.
set -euo pipefail
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-${OMP_NUM_THREADS:-1}}"
cd "$(dirname "$0")/.."
source scripts/setup.sh
if [ "${1:-}" = "--slow" ]; then shift; exec .venv/bin/python -m pytest -m slow "$@"; fi
.venv/bin/ruff check src tests scripts benchmarks          # the linter (pyproject.toml [tool.ruff])
.venv/bin/ruff format --check -q src tests scripts benchmarks
exec .venv/bin/python -m pytest "$@"
