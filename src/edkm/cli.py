"""The `edkm` command line: compress, eval, generate, size, bench.

    edkm compress --out runs/default          # fine-tune the bundled model with eDKM, export, report
    edkm eval runs/default --text my.txt
    edkm generate runs/default --prompt "Once upon a time"
    edkm size llama-7b --bits 3 --override 'embed_tokens|lm_head=8'
    edkm bench memory --shape 4096 4096 --bits 3
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _overrides(items: Sequence[str]) -> dict[str, dict[str, int]]:
    out = {}
    for item in items:
        pattern, sep, bits = item.rpartition("=")
        if not sep or not bits.isdigit():
            raise SystemExit(f"--override expects REGEX=BITS, got {item!r}")
        out[pattern] = {"bits": int(bits)}
    return out


def cmd_size(args: argparse.Namespace) -> None:
    from .config import PalettizeConfig
    from .size import GiB, load_config, meta_model, palettized_size

    config = PalettizeConfig(bits=args.bits, group_size=args.group_size, memory="plain", overrides=_overrides(args.override))
    r = palettized_size(meta_model(load_config(args.model)), config)
    print(f"parameters: {r['params'] / 1e9:.3f} B, clustered: {r['clustered_params'] / 1e9:.3f} B")
    print(f"fp16: {r['fp16_bytes'] / GiB:.2f} GiB -> palettized: {r['palettized_bytes'] / GiB:.2f} GiB "
          f"({r['fp16_bytes'] / r['palettized_bytes']:.1f}x smaller; GiB = 2^30 bytes)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edkm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("size", help="fp16 and palettized size of a model config (meta device, no weights)")
    p.add_argument("model", help="preset (llama-7b, llama-13b, llama-30b), config.json or model folder")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=None, help="output channels per LUT (default: one LUT per tensor)")
    p.add_argument("--override", action="append", default=[], metavar="REGEX=BITS", help="e.g. 'embed_tokens|lm_head=8'")
    p.set_defaults(func=cmd_size)

    from .commands import add_commands  # compress / eval / generate / bench

    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"edkm {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
