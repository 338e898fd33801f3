"""Where a model given on the command line lies: a run folder, an edkm folder, a packed file or a plain HF folder.

One resolver for every command that reads a model (``eval``, ``generate``, ``export``, the benchmarks), over the
one table of file names (:mod:`edkm.export.files`).

Example:
    >>> locate("/nonexistent/model.edkm.safetensors")
    Traceback (most recent call last):
    ...
    FileNotFoundError: model not found: /nonexistent/model.edkm.safetensors
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from edkm.export.files import FOLDER_WEIGHTS, PACKED_FILE, TOKENIZER_CONFIG, is_edkm_folder


class Located(NamedTuple):
    """``source``: what to load (a folder or a packed file); ``weights``: the packed weights file,
    None if not packed."""

    source: Path
    weights: Path | None


def locate(path: str | os.PathLike) -> Located:
    """Resolve ``path``: an edkm folder (also a run folder) -> itself and its weights; a folder holding only
    :data:`~edkm.export.files.PACKED_FILE` -> that file; a packed file -> itself; any other folder -> itself,
    unpacked."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model not found: {path}")
    if p.is_file():
        return Located(p, p)
    if is_edkm_folder(p):
        return Located(p, p / FOLDER_WEIGHTS)
    if (p / PACKED_FILE).is_file():
        return Located(p / PACKED_FILE, p / PACKED_FILE)
    return Located(p, None)


def locate_packed(path: str | os.PathLike) -> Located:
    """:func:`locate` for commands that need a packed model (``export``); FileNotFoundError for anything else."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no packed edkm model at {path}")
    found = locate(path)
    if found.weights is None:
        raise FileNotFoundError(
            f"{path} is neither an edkm model folder (config.json with quant_method 'edkm') "
            f"nor a folder holding {PACKED_FILE}"
        )
    return found


def tokenizer_folder(source: Path, tokenizer: str | os.PathLike | None = None) -> Path | None:
    """The tokenizer folder for ``source``: ``tokenizer`` if given (checked), else None = the model's own.

    A packed file needs one beside it (``tokenizer_config.json``) or ``--tokenizer``.
    """
    if tokenizer is not None:
        if not (Path(tokenizer) / TOKENIZER_CONFIG).is_file():
            raise FileNotFoundError(f"--tokenizer {tokenizer}: no {TOKENIZER_CONFIG} there")
        return Path(tokenizer)
    if source.is_file() and not (source.parent / TOKENIZER_CONFIG).is_file():
        raise FileNotFoundError(f"{source} has no tokenizer beside it ({TOKENIZER_CONFIG}); pass --tokenizer FOLDER")
    return None


def load_model(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a run folder, a packed ``.safetensors`` file or an HF folder.

    A packed file takes the tokenizer beside it or ``--tokenizer`` (:func:`tokenizer_folder`); a ``.gguf`` file, a
    folder with one or a known name (``smollm2-135m``) is dequantized by transformers.
    """
    # deferred: transformers and torch load only when a command runs
    from transformers import AutoTokenizer

    from edkm.hf.load import load_palettized
    from edkm.models import load_causal_lm
    from edkm.models.gguf import resolve_gguf

    gguf = resolve_gguf(str(path))
    if gguf is not None:  # a .gguf file, a folder with one, or a known name: dequantized by transformers
        return load_causal_lm(gguf)
    p, weights = locate(path)
    tok_dir = tokenizer_folder(p, tokenizer)
    if weights is not None:
        model = load_palettized(p).eval()
        return model, AutoTokenizer.from_pretrained(tok_dir or (p if p.is_dir() else p.parent), local_files_only=True)
    model, tok = load_causal_lm(p)
    return model, AutoTokenizer.from_pretrained(tok_dir, local_files_only=True) if tok_dir else tok


__all__ = ["Located", "load_model", "locate", "locate_packed", "tokenizer_folder"]
