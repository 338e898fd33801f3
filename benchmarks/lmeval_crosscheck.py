"""Our zero-shot scorer against lm-evaluation-harness on the real model (``edkm.eval.lmeval_check``).

    pip install 'lm-eval>=0.4.13,<0.5'     # or: pip install -e '.[lmeval]'
    python benchmarks/lmeval_crosscheck.py [--model smollm2-135m] [--limit 100] \
        [--out benchmarks/results/lmeval_crosscheck_smollm2.json]

The five tasks of the real-model table (PIQA, ARC-Easy, ARC-Challenge, HellaSwag, WinoGrande), the first
``--limit`` items of the committed field subsets (``edkm/assets/eval/field500``), the same in-memory model
scored by both: acc / acc_norm of each and the largest difference between their log-likelihoods of one
(item, choice). One process, the torch threads of the environment (recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import edkm
from edkm.eval.lmeval_check import CHECKED, crosscheck, summary
from edkm.models import load_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="an HF folder, a .gguf file or a known name")
    parser.add_argument("--limit", type=int, default=100, help="first N items of each task")
    parser.add_argument("--out", default="benchmarks/results/lmeval_crosscheck_smollm2.json")
    args = parser.parse_args()
    import lm_eval

    data_dir = Path(edkm.__file__).parent / "assets" / "eval" / "field500"
    model, tokenizer = load_causal_lm(args.model)
    start = time.perf_counter()
    tasks = crosscheck(model, tokenizer, CHECKED, data_dir, args.limit)
    result = {
        "model": args.model,
        "data": "edkm/assets/eval/field500",
        "limit": args.limit,
        "lm_eval_version": lm_eval.__version__,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - start, 1),
        "loadavg_1min": os.getloadavg()[0],
        "tasks": tasks,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(summary(tasks))


if __name__ == "__main__":
    main()
