"""Options several commands share (device, FSDP, per-module bits) and where benchmarks write by default.

Building a parser imports nothing heavy: ``edkm --help`` answers without torch.

Example:
    >>> parse_overrides(["embed_tokens|lm_head=8"])
    {'embed_tokens|lm_head': {'bits': 8}}
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

DEVICES = ("auto", "cpu", "cuda")
BENCH_RUN_DIR = "runs/bench"  # benchmarks write here unless --out names another place


def add_device_argument(parser: Any) -> None:
    """``--device auto|cpu|cuda``."""
    parser.add_argument(
        "--device",
        default="auto",
        choices=DEVICES,
        help="where the model, data and clustering state live (auto = CUDA when present)",
    )


def parse_overrides(items: Sequence[str]) -> dict[str, dict[str, int]]:
    """``REGEX=BITS`` items as PalettizeConfig overrides."""
    out = {}
    for item in items:
        pattern, sep, value = item.rpartition("=")
        if not sep or not value.isdigit() or not 1 <= int(value) <= 8:
            raise ValueError(f"--override expects REGEX=BITS with BITS from 1 to 8, got {item!r}")
        out[pattern] = {"bits": int(value)}
    return out


def add_fsdp_arguments(p: argparse.ArgumentParser) -> None:
    """``--fsdp`` and its options, for ``edkm compress``."""
    g = p.add_argument_group("FSDP2 (run under torchrun; gloo on CPU, nccl on CUDA)")
    g.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the eDKM fine-tuning with FSDP2 (fully_shard per decoder layer and the root), "
        "sharded DCP checkpoints; without torchrun: one process (a group of one)",
    )
    g.add_argument(
        "--mixed-precision",
        choices=["bf16", "fp16", "fp64"],
        default=None,
        help="FSDP compute dtype over fp32 master weights; fp64 (compute and gradient sums in float64) "
        "gives the same steps on any number of processes, one included",
    )
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute each decoder layer in backward")
    g.add_argument(
        "--fsdp-gathered-dkm",
        action="store_true",
        help="run DKM on the weight FSDP gathered (every rank clusters all of it) instead of sharded DKM",
    )
