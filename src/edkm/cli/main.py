"""The `edkm` command line: compress, eval, generate, size, bench (also `python -m edkm`).

    edkm compress --out runs/default          # fine-tune the bundled model with eDKM, export, report
    edkm eval runs/default --text my.txt      # a run folder, a packed .safetensors file or an HF folder
    edkm generate runs/default --prompt "Once upon a time"
    edkm size llama-2-7b --bits 3 --override 'embed_tokens|lm_head=8'
    edkm bench memory --shape 1024 1024 --bits 3

Building the parser imports neither torch nor transformers: `--help` and `--version` answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from edkm import __version__
from edkm.cli.validate import bits, positive_int
from edkm.jobs.runstate import resume_command
from edkm.jobs.presets import PRESETS


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default after its help (unless None, False or already in the help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default == argparse.SUPPRESS or not action.option_strings:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else "%(default)s"
        return f"{text} (default: {shown})"


class Parser(argparse.ArgumentParser):
    """argparse with edkm's help format and one-line errors; subcommand parsers inherit both."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _overrides(items: Sequence[str]) -> dict[str, dict[str, int]]:
    out = {}
    for item in items:
        pattern, sep, value = item.rpartition("=")
        if not sep or not value.isdigit() or not 1 <= int(value) <= 8:
            raise ValueError(f"--override expects REGEX=BITS with BITS from 1 to 8, got {item!r}")
        out[pattern] = {"bits": int(value)}
    return out


def cmd_size(args: argparse.Namespace) -> None:
    from edkm.config import PalettizeConfig
    from edkm.jobs.size import load_config, meta_model, palettized_size
    from edkm.jobs.presets import human_bytes, human_count

    config = PalettizeConfig(bits=args.bits, group_size=args.group_size, memory="plain", overrides=_overrides(args.override))
    r = palettized_size(meta_model(load_config(args.model)), config)
    print(f"parameters: {human_count(r['params'])}, clustered: {human_count(r['clustered_params'])}")
    print(f"fp16: {human_bytes(r['fp16_bytes'])} -> palettized: {human_bytes(r['palettized_bytes'])} "
          f"({r['fp16_bytes'] / r['palettized_bytes']:.1f}x smaller; KiB/MiB/GiB = 2^10/2^20/2^30 bytes)")


def add_size_parser(sub: Any) -> None:
    p = sub.add_parser("size", help="fp16 and palettized size of a model config (meta device, no weights)",
                       description="fp16 and palettized size of a model's weights, from its config alone.")
    p.add_argument("model", help=f"preset ({', '.join(PRESETS)}), a config.json or a model folder")
    p.add_argument("--bits", type=bits, default=3, help="bits per clustered weight (LUT of 2^bits entries)")
    p.add_argument("--group-size", type=positive_int, default=None,
                   help="output channels per LUT; must divide every layer's rows (default: one LUT per tensor)")
    p.add_argument("--override", action="append", default=[], metavar="REGEX=BITS",
                   help="other bits for modules matching REGEX, e.g. 'embed_tokens|lm_head=8' (repeatable)")
    p.set_defaults(func=cmd_size)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="edkm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edkm {__version__}", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_size_parser(sub)

    from edkm.cli.commands import add_commands  # compress / eval / generate / bench (parsers only: no torch)

    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line as given (for the --resume hint after Ctrl-C)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"edkm {args.command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err
    except KeyboardInterrupt:  # Ctrl-C: one line, no traceback (rank 0 only under torchrun)
        if os.environ.get("RANK", "0") == "0":
            hint = f"; continue with: {resume_command(argv)}" if args.command == "compress" else ""
            print(f"\nedkm {args.command}: interrupted{hint}", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
