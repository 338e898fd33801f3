"""Checks of CLI flags and input files that run before any model loads (no torch import here).

Argparse ``type=`` converters reject out-of-range numbers at parse time with one line; the
``check_*`` functions catch what needs several flags or the file system.

Example:
    >>> positive_int("16")
    16
    >>> positive_int("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: must be an integer >= 1, got '0'
    >>> fraction("0.2"), bits("3")
    (0.2, 3)
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path


def _number(kind: Callable[[str], float], ok: Callable[[float], bool], what: str) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    convert.__name__ = what  # argparse names the type in its messages
    return convert


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a number > 0")
nonnegative_float = _number(float, lambda v: v >= 0, "a number >= 0")
fraction = _number(float, lambda v: 0 < v < 1, "a number between 0 and 1 (exclusive)")
unit_weight = _number(float, lambda v: 0 <= v <= 1, "a number from 0 to 1")
top_p = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
bits = _number(int, lambda v: 1 <= v <= 8, "an integer from 1 to 8")
bits_or_zero = _number(int, lambda v: 0 <= v <= 8, "an integer from 0 to 8")


def check_file(path: str | None, flag: str) -> None:
    """FileNotFoundError / ValueError naming ``flag`` unless ``path`` is None or a non-empty file."""
    if path is None:
        return
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file" if not p.exists() else f"{flag} {path}: not a file")
    if p.stat().st_size == 0:
        raise ValueError(f"{flag} {path}: the file is empty")


def model_context(model_dir: str | Path) -> int | None:
    """The context length in ``<model_dir>/config.json`` (FileNotFoundError without one); None for a GGUF model,
    whose file is checked (in milliseconds) instead."""
    from edkm.models.gguf import check_gguf, resolve_gguf  # deferred: torch, only when a command runs

    gguf = resolve_gguf(model_dir)
    if gguf is not None:
        check_gguf(gguf)
        return None
    config = Path(model_dir) / "config.json"
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"--model {model_dir}: not a Hugging Face checkpoint directory")
    if not config.is_file():
        raise FileNotFoundError(f"--model {model_dir}: no config.json (not a Hugging Face checkpoint directory)")
    data = json.loads(config.read_text())
    return next(
        (data[k] for k in ("max_position_embeddings", "n_positions", "max_seq_len") if isinstance(data.get(k), int)),
        None,
    )


def check_compress(args: argparse.Namespace, bundled_model_dir: Path) -> None:
    """Every cross-flag and file check of ``edkm compress`` (ranges are checked by argparse)."""
    # deferred: torch loads only when the command runs (building the parser must not import it)
    from edkm.data.text import load_alpaca
    from edkm.memory.plan import parse_memory

    check_file(args.text, "--text")
    check_file(args.alpaca, "--alpaca")
    check_file(args.eval_text, "--eval-text")
    if args.alpaca:
        load_alpaca(args.alpaca)  # every record checked now, not after the model has loaded

    parse_memory(args.memory)  # an unknown --memory fails before the model loads
    if args.batch_size % args.grad_accum:
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by --grad-accum {args.grad_accum}")
    limit = model_context(args.model or bundled_model_dir)
    if limit is not None and args.context > limit:
        raise ValueError(
            f"--context {args.context} exceeds the model's context of {limit} tokens (max_position_embeddings)"
        )
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out}: exists and is not a folder")


def check_eval(args: argparse.Namespace) -> None:
    """``edkm eval``: something to evaluate, --holdout only with --text, the text file present."""
    if args.holdout is not None and not args.text:
        raise ValueError("--holdout needs --text (it selects the held-out part of that file)")
    if not args.text and not args.tasks:
        raise ValueError("nothing to evaluate: give --text FILE and/or --tasks piqa,arc_easy,...")
    check_file(args.text, "--text")


__all__ = [
    "bits",
    "bits_or_zero",
    "check_compress",
    "check_eval",
    "check_file",
    "fraction",
    "model_context",
    "nonnegative_float",
    "nonnegative_int",
    "positive_float",
    "positive_int",
    "top_p",
    "unit_weight",
]
