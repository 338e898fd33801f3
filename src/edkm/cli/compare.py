"""``edkm compare``: eDKM against the peers under one train/validation/test protocol."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_compare_parser(sub: Any) -> None:
    p = sub.add_parser(
        "compare", help="eDKM vs GPTQ, AWQ, SqueezeLLM-style, HQQ, RTN, torchao QAT (train/val/test protocol)"
    )
    p.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=None, help="subset of the methods (default: all); see --list")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--context", type=int, default=256)
    p.add_argument(
        "--edkm-lrs",
        type=float,
        nargs="+",
        default=[5e-4, 1e-3, 2e-3],
        help="eDKM learning rates to choose from on validation",
    )
    p.add_argument(
        "--edkm-taus",
        type=float,
        nargs="*",
        default=[0.1, 0.4],
        help="starting taus tried at the middle eDKM lr (besides --tau); empty: tau not tuned",
    )
    p.add_argument("--tau", type=float, default=0.2, help="default starting tau of DKM (annealed 100x)")
    p.add_argument(
        "--qat-lrs",
        type=float,
        nargs="+",
        default=[3e-5, 1e-4, 3e-4, 1e-3, 2e-3],
        help="QAT learning rates to choose from on validation",
    )
    p.add_argument("--model", default=None)
    p.add_argument("--text", default=None)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--work", default="runs/compare", help="saved models and cached controls")
    p.add_argument("--resume", action="store_true", help="keep the rows already in the JSON files (same settings)")
    p.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> None:
    from edkm.jobs.compare import DEFAULT_METHODS, CompareConfig, compare  # deferred: torch, transformers, peers
    from edkm.jobs.compare_report import write_plot

    cfg = CompareConfig(
        bits=args.bits,
        seeds=args.seeds,
        methods=args.methods or list(DEFAULT_METHODS),
        steps=args.steps,
        batch_size=args.batch_size,
        context=args.context,
        edkm_lrs=args.edkm_lrs,
        edkm_taus=args.edkm_taus,
        tau=args.tau,
        qat_lrs=args.qat_lrs,
        model=args.model,
        text=args.text,
        out=args.out,
        work=args.work,
        resume=args.resume,
    )
    compare(cfg)
    print(f"wrote {write_plot(Path(cfg.out))}")
