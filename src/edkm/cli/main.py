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
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from edkm import __version__
from edkm.cli.bench import add_bench_parser
from edkm.cli.compare import add_compare_parser
from edkm.cli.compress import add_compress_parser
from edkm.cli.evaluate import add_eval_parser, add_generate_parser
from edkm.cli.export import add_export_parser
from edkm.cli.plan import add_plan_parser
from edkm.cli.size import add_size_parser


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default after its help (unless None, False or already in the help)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default == argparse.SUPPRESS
            or not action.option_strings
        ):
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


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="edkm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"edkm {__version__}", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        add_compress_parser,
        add_eval_parser,
        add_generate_parser,
        add_size_parser,
        add_export_parser,
        add_bench_parser,
        add_compare_parser,
        add_plan_parser,
    ):  # one module per command
        add(sub)
    return parser


# transformers imports torchao, when installed, for its quantizer registry; torchao's import then warns about its
# CUDA-only kernels and torch about deprecated calls in it: nothing a command that does not use torchao can act on
QUIET_LOGGERS = ("torchao", "torch.utils._pytree")
USES_TORCHAO = ("compare",)


def quiet_unasked_libraries(command: str) -> None:
    """Keep the import warnings of libraries ``command`` does not use off stderr (errors still show)."""
    if command not in USES_TORCHAO:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


def resume_command(argv: Sequence[str]) -> str:
    """The command line that continues an interrupted ``edkm`` run.

    >>> resume_command(["compress", "--steps", "20"])
    'edkm compress --steps 20 --resume'
    """
    args = list(argv)
    return shlex.join(["edkm", *args, *([] if "--resume" in args else ["--resume"])])


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # the command line as given (for the --resume hint after Ctrl-C)
    quiet_unasked_libraries(args.command)
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
