"""``edkm size``: fp16 and palettized size of a model's weights, from its config alone (meta device)."""

from __future__ import annotations

import argparse
from typing import Any

from edkm.cli.options import parse_overrides
from edkm.cli.validate import bits, positive_int
from edkm.jobs.presets import PRESETS, human_bytes, human_count


def cmd_size(args: argparse.Namespace) -> None:
    # deferred: the size job imports torch, which building the parser must not
    from edkm.config import PalettizeConfig
    from edkm.jobs.size import load_config, meta_model, palettized_size

    config = PalettizeConfig(bits=args.bits, group_size=args.group_size, overrides=parse_overrides(args.override))
    r = palettized_size(meta_model(load_config(args.model)), config)
    print(f"parameters: {human_count(r['params'])}, clustered: {human_count(r['clustered_params'])}")
    print(
        f"fp16: {human_bytes(r['fp16_bytes'])} -> palettized: {human_bytes(r['palettized_bytes'])} "
        f"({r['fp16_bytes'] / r['palettized_bytes']:.1f}x smaller; KiB/MiB/GiB = 2^10/2^20/2^30 bytes)"
    )


def add_size_parser(sub: Any) -> None:
    p = sub.add_parser(
        "size",
        help="fp16 and palettized size of a model config (meta device, no weights)",
        description="fp16 and palettized size of a model's weights, from its config alone.",
    )
    p.add_argument("model", help=f"preset ({', '.join(PRESETS)}), a config.json or a model folder")
    p.add_argument("--bits", type=bits, default=3, help="bits per clustered weight (LUT of 2^bits entries)")
    p.add_argument(
        "--group-size",
        type=positive_int,
        default=None,
        help="output channels per LUT; must divide every layer's rows (default: one LUT per tensor)",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="REGEX=BITS",
        help="other bits for modules matching REGEX, e.g. 'embed_tokens|lm_head=8' (repeatable)",
    )
    p.set_defaults(func=cmd_size)
