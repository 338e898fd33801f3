"""Short eDKM probes on SmolLM2-135M that choose the real-model recipe's knobs on validation text, never on WikiText-2.

    python benchmarks/recipe_probe.py --warm-start fisher --group-size 16 --steps 4 --lr 1e-4 --tau 0.05 --iters 0
        [--out benchmarks/results/smollm2_recipe_probe.json]   # appends (or replaces) this probe's entry

One probe: the 3-bit plan of `bash scripts/run.sh --model smollm2-135m` (8-bit embedding/head, the instruction
records' training split, the original as the KL teacher, batch 4 x 256 tokens, seed 0) with the given warm start,
LUT granularity, lr, tau (annealed to 0.002 over the probe) and DKM centroid updates per forward (``--iters``;
0 keeps each LUT at its warm start and trains the weights through the soft assignment only). Reported: the
validation perplexity (the first 8,192 tokens of the records' validation split, 2048-token windows) of the hard
warm start and of the finalized model after ``--steps`` steps, the per-step KL, seconds. The probe's schedule is
the whole run's in miniature (warmup min(20, steps)); it ranks knobs, it does not predict a 100-step run.
Two threads, one process.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import edkm
from edkm.config import EMBEDDING_LAYERS
from edkm.eval import perplexity
from edkm.jobs.compress import CompressConfig, split_data
from edkm.models import load_causal_lm
from edkm.peers.calibrate import warm_start_importance
from edkm.peers.fast import calibration
from edkm.training.finetune import finetune
from edkm.training.loop import TrainConfig
from edkm.transform import finalize_, palettize_, warm_start_

ASSETS = Path(edkm.__file__).parent / "assets"
VALIDATION_TOKENS = 8192


def probe(args: argparse.Namespace) -> dict:
    """One probe's entry (see the module docstring)."""
    model, tokenizer = load_causal_lm("smollm2-135m")
    plan = edkm.PalettizeConfig(bits=3, tau=args.tau, tau_end=0.002, iters=args.iters, group_size=args.group_size,
                                overrides={EMBEDDING_LAYERS: {"bits": 8}})  # fmt: skip
    train = TrainConfig(steps=args.steps, batch_size=4, lr=args.lr, warmup=min(20, args.steps), seed=0)
    cfg = CompressConfig(model="smollm2-135m", alpaca=str(ASSETS / "instruction" / "instruction-data.json"),
                         plan=plan, warm_start=args.warm_start, train=train)  # fmt: skip
    data, validation, _test = split_data(cfg, tokenizer)
    validation = validation[: VALIDATION_TOKENS + 1]
    start = time.perf_counter()
    teacher = copy.deepcopy(model).eval().requires_grad_(False)
    importance = warm_start_importance(model, calibration(data), args.warm_start, plan) or {}  # the original's
    warm_start_(palettize_(model, plan), importance)
    warm_seconds = time.perf_counter() - start
    val_warm = perplexity(finalize_(copy.deepcopy(model)), validation, context=2048)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        losses = finetune(model, data, train, Path(tmp) / "checkpoint.pt", False, teacher, 1.0)
    train_seconds = time.perf_counter() - start
    return {
        "warm_start": args.warm_start,
        "group_size": args.group_size,
        "steps": args.steps,
        "lr": args.lr,
        "tau": args.tau,
        "iters": args.iters,
        "val_ppl_warm_start": val_warm,
        "val_ppl_after": perplexity(finalize_(model), validation, context=2048),
        "val_ppl_original": perplexity(teacher, validation, context=2048),
        "losses": losses,
        "warm_start_seconds": round(warm_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "loadavg_1min": os.getloadavg()[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm-start", choices=["kmeans", "activation", "fisher"], default="fisher")
    parser.add_argument("--group-size", type=int, default=None, help="rows per LUT (default: one LUT per tensor)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--tau", type=float, default=0.05)
    parser.add_argument("--iters", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/smollm2_recipe_probe.json")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    entry = probe(args)
    out = Path(args.out)
    probes = json.loads(out.read_text())["probes"] if out.is_file() else []
    knobs = ("warm_start", "group_size", "steps", "lr", "tau", "iters")
    probes = [p for p in probes if any(p[k] != entry[k] for k in knobs)] + [entry]
    out.write_text(json.dumps({"model": "smollm2-135m", "bits": 3, "embed_bits": 8, "probes": probes}, indent=1) + "\n")
    print(json.dumps({k: entry[k] for k in (*knobs, "val_ppl_warm_start", "val_ppl_after")}))


if __name__ == "__main__":
    main()
