"""The Hugging Face folder format: what ``edkm compress --out DIR`` writes and ``from_pretrained(DIR)`` loads.

``DIR`` holds ``config.json`` (with ``quantization_config``, ``quant_method: "edkm"``),
``model.safetensors`` (packed b-bit indices and fp16 LUTs, no pickle), ``generation_config.json``,
the tokenizer files and a model card ``README.md``. After ``import edkm``,
``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` loads it (see :mod:`edkm.hf`).
Every file is replaced atomically and gets the usual permissions.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from edkm.atomic import atomic_path, file_mode
from edkm.export.errors import FormatError
from edkm.export.files import FOLDER_WEIGHTS, is_edkm_folder
from edkm.hf import register
from edkm.models.quiet import quiet_loading


def save_folder(model: nn.Module, out: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Write a finalized Hugging Face model (and its tokenizer) into ``out`` as an edkm folder; returns ``out``.

    Other files already in ``out`` stay; each written file replaces its old version atomically.
    """
    # deferred: edkm.hf.quantizer imports transformers (the hf extra), needed only when a folder is written
    from edkm.hf.quantizer import attach

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    attach(model)
    staging = out / f".staging-{secrets.token_hex(6)}"
    try:
        model.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for item in sorted(staging.iterdir(), key=lambda p: p.name == FOLDER_WEIGHTS):  # weights last
            os.chmod(item, file_mode())
            with open(item, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def load_folder(path: str | os.PathLike) -> nn.Module:
    """Load an edkm folder with transformers; any problem with its files raises FormatError."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {path}: not an edkm model folder")
    if not is_edkm_folder(path):
        raise FormatError(
            f"{path}/config.json has no quantization_config with quant_method 'edkm': not an edkm model folder"
        )
    # deferred: transformers is the hf extra, loaded only when a Hugging Face model is loaded
    from transformers import AutoModelForCausalLM

    register()
    try:
        with quiet_loading():
            return AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except FormatError:
        raise
    except Exception as err:  # transformers' own errors for a damaged config.json or weights file
        raise FormatError(f"{path}: transformers cannot load it: {type(err).__name__}: {err}") from err


def write_model_card(out: str | os.PathLike, text: str) -> None:
    """Write ``README.md`` (the model card) into ``out`` atomically."""
    with atomic_path(Path(out) / "README.md") as tmp:
        tmp.write_text(text)
