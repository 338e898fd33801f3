#!/usr/bin/env bash
# Create (or reuse) .venv and install edkm with the CPU build of torch first.
# Sourced by run.sh and test.sh; EDKM_EXTRAS picks the extras (default: hf,dev).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==2.13.0"   # the CPU build (a bare 'torch' pulls a multi-GB CUDA build)
fi
# reinstall only when pyproject.toml or the extras changed (run.sh and test.sh may run side by side)
STAMP="$(sha256sum pyproject.toml | cut -c1-16) ${EDKM_EXTRAS:-hf,dev,bench,coreml,peers}"
if [ "$(cat .venv/.edkm-installed 2>/dev/null)" != "$STAMP" ] || ! .venv/bin/python -c "import edkm" 2>/dev/null; then
  .venv/bin/pip install -q -e ".[${EDKM_EXTRAS:-hf,dev,bench,coreml,peers}]"
  echo "$STAMP" > .venv/.edkm-installed
fi
