"""``edkm plan``: per-GPU peak memory of FSDP fine-tuning with eDKM, from the model config alone."""

from __future__ import annotations

from typing import Any


def cmd_plan(args: Any) -> None:
    """`edkm plan`: print the table (and write --json)."""
    from edkm.atomic import write_json  # deferred: the estimator imports torch, which building the parser must not
    from edkm.jobs.plan import PlanOptions, estimate, markdown

    opts = PlanOptions(
        bits=args.bits,
        embed_bits=args.embed_bits,
        gpus=args.gpus,
        gpu_memory_gib=args.gpu_memory_gib,
        batch=args.batch,
        seq=args.seq,
        mixed_precision=not args.fp32,
        activation_checkpointing=args.activation_checkpointing,
    )
    result = estimate(args.model, opts)
    print(markdown(result))
    if args.json:
        write_json(args.json, result)


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
    p.set_defaults(func=cmd_plan)
