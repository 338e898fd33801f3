"""Command-line options of FSDP fine-tuning (kept free of torch imports: the parser must stay light)."""

from __future__ import annotations

import argparse


def add_fsdp_arguments(p: argparse.ArgumentParser) -> None:
    """``--fsdp`` and its options, for ``edkm compress``."""
    g = p.add_argument_group("FSDP2 (run under torchrun; gloo on CPU, nccl on CUDA)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard the eDKM fine-tuning with FSDP2 (fully_shard per decoder layer and the root), "
                        "sharded DCP checkpoints")
    g.add_argument("--mixed-precision", choices=["bf16", "fp16"], default=None, help="FSDP param dtype (fp32 master weights)")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute each decoder layer in backward")
    g.add_argument("--fsdp-gathered-dkm", action="store_true",
                   help="run DKM on the weight FSDP gathered (every rank clusters all of it) instead of sharded DKM")
