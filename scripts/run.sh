#!/usr/bin/env bash
# The main job: fine-tune the bundled stories260K with eDKM at 3 bits (8-bit embedding), export the
# packed model, reload it, and print fp / RTN / k-means / eDKM perplexity and size plus a sample.
# Extra arguments go to `edkm compress` (e.g. --bits 4 --out runs/4bit).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec .venv/bin/edkm compress --out runs/default "$@"
