"""Model loading and the bundled real pretrained model.

``BUNDLED_MODEL_DIR`` is a standard Hugging Face ``LlamaForCausalLM`` checkpoint of Karpathy's ``stories260K``
(260K parameters, trained on TinyStories, MIT), converted from llama2.c by ``scripts/convert_stories260k.py``;
``BUNDLED_TEXT`` is a TinyStories validation excerpt (CDLA-Sharing-1.0) for in-domain perplexity and smoke fine-tuning.
See ``assets/stories260K/PROVENANCE.md``.

``transformers`` is imported only inside :func:`load_causal_lm`, so importing this module stays light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from edkm.models.gguf import load_gguf, resolve_gguf
from edkm.models.quiet import quiet_loading

__all__ = ["BUNDLED_MODEL_DIR", "BUNDLED_TEXT", "INSTRUCTION_DATA", "WIKITEXT2_TEST", "load_causal_lm"]

_ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_MODEL_DIR: Path = _ASSETS / "stories260K"
BUNDLED_TEXT: Path = _ASSETS / "tinystories" / "tinystories_val.txt"
INSTRUCTION_DATA: Path = _ASSETS / "instruction" / "instruction-data.json"  # 1,100 Alpaca-format records, Apache-2.0
WIKITEXT2_TEST: Path = _ASSETS / "wikitext2" / "wiki.test.raw"  # evaluation only (CC BY-SA 3.0), see its PROVENANCE


def _check_checkpoint_dir(path: Path) -> None:
    """Raise a clear error unless ``path`` is a directory with ``config.json`` and weight files."""
    if not path.exists():
        raise FileNotFoundError(f"model directory not found: {path}")
    if not path.is_dir():
        raise ValueError(f"expected a Hugging Face checkpoint directory, got a file: {path}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path}: not a Hugging Face checkpoint directory")
    if not (any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))):
        raise FileNotFoundError(f"no weights in {path}: expected *.safetensors or pytorch_model*.bin")


def load_causal_lm(path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` from a local Hugging Face checkpoint directory or a GGUF file (offline).

    ``path=None`` loads the bundled ``stories260K`` model; a ``.gguf`` file, a folder holding one, or a known name
    (``smollm2-135m``) loads through :func:`edkm.models.gguf.load_gguf` (dequantized to ``dtype``). The model
    comes from ``AutoModelForCausalLM`` in ``dtype`` and eval mode, the tokenizer from ``AutoTokenizer``; both
    with ``local_files_only=True``.

    Raises ``FileNotFoundError`` when the directory, its ``config.json`` or its weights are missing, and
    ``ValueError`` when ``path`` is a file.
    """
    gguf = None if path is None else resolve_gguf(path)  # a .gguf file, a folder with one, or a known name
    if gguf is not None:
        return load_gguf(gguf, dtype)
    directory = BUNDLED_MODEL_DIR if path is None else Path(path).expanduser()
    _check_checkpoint_dir(directory)
    # deferred: transformers (the hf extra) loads only with a model, so importing this module stays light
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, local_files_only=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model, tokenizer
