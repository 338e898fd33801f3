"""Command-line options of FSDP fine-tuning and `edkm plan` (kept free of torch imports: the parser must stay light)."""

from __future__ import annotations

import argparse
from typing import Any


def add_fsdp_arguments(p: argparse.ArgumentParser) -> None:
    """``--fsdp`` and its options, for ``edkm compress``."""
    g = p.add_argument_group("FSDP2 (run under torchrun; gloo on CPU, nccl on CUDA)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard the eDKM fine-tuning with FSDP2 (fully_shard per decoder layer and the root), "
                        "sharded DCP checkpoints; without torchrun: one process (a group of one)")
    g.add_argument("--mixed-precision", choices=["bf16", "fp16", "fp64"], default=None,
                   help="FSDP compute dtype over fp32 master weights; fp64 (compute and gradient sums in float64) "
                        "gives the same steps on any number of processes, one included")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute each decoder layer in backward")
    g.add_argument("--fsdp-gathered-dkm", action="store_true",
                   help="run DKM on the weight FSDP gathered (every rank clusters all of it) instead of sharded DKM")


def run_plan(args: argparse.Namespace) -> None:
    """`edkm plan` (imports the estimator only when it runs)."""
    from edkm.jobs.plan import cmd_plan

    cmd_plan(args)


def add_plan_parser(sub: Any) -> None:
    """Register `edkm plan` (no heavy imports here)."""
    p = sub.add_parser("plan", help="per-GPU peak memory of FSDP fine-tuning with eDKM (no weights needed)")
    p.add_argument("model", help="preset (llama-7b, ...), config.json or model folder")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--embed-bits", type=int, default=8, help="bits of embedding and output layer (0 = same as --bits)")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    p.add_argument("--batch", type=int, default=1, help="sequences per GPU")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--fp32", action="store_true", help="fp32 compute (default: bf16 mixed precision)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--json", default=None, help="also write the result as JSON")
    p.set_defaults(func=run_plan)
