#!/usr/bin/env bash
# The main job: fine-tune the bundled stories260K with eDKM at 3 bits (8-bit embedding), export the
# packed model, reload it, and print fp / RTN / k-means / eDKM perplexity and size plus a sample.
# Extra arguments go to `edkm compress` (e.g. --bits 4 --out runs/4bit).
#
# `--model smollm2-135m` (first) runs the real-LLM recipe instead (install the model first:
# `bash scripts/setup.sh --smollm2`): the original model as the distillation teacher, the 1,100 Apache-2.0
# instruction records as training data, WikiText-2 test (first 16,384 tokens, 2048-token windows) as the
# evaluation text, then the zero-shot tasks of every model in the run folder (`edkm bench zeroshot`).
# The recipe was chosen on validation (docs/results.md, "Choosing the recipe on validation"): a
# Fisher-weighted warm start, the LUTs kept at it (--iters 0), tau 0.05 -> 0.002.
# Every step resumes: run the same command again with --resume after a stop.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
if [[ "${1:-}" == "--model" && "${2:-}" == "smollm2-135m" ]]; then
  shift 2
  out=runs/smollm2-135m
  args=("$@")
  for ((i = 0; i < ${#args[@]}; i++)); do [[ "${args[i]}" == "--out" ]] && out="${args[i + 1]}"; done
  .venv/bin/edkm compress --model smollm2-135m --out "$out" \
    --alpaca src/edkm/assets/instruction/instruction-data.json \
    --eval-text src/edkm/assets/wikitext2/wiki.test.raw --eval-context 2048 --eval-tokens 16384 \
    --bits 3 --embed-bits 8 --steps 100 --batch-size 4 --context 256 --lr 3e-4 --distill 1.0 \
    --warm-start fisher --iters 0 --tau 0.05 --checkpoint-every 10 "$@"
  exec .venv/bin/edkm bench zeroshot "$out" --data-dir src/edkm/assets/eval/field500 --limit 100 \
    --out "$out/zeroshot.json"
fi
exec .venv/bin/edkm compress --out runs/default "$@"
