"""The names of the files edkm writes, in one table, and the one test of what a folder holds (no torch import).

A run folder (``edkm compress --out DIR``) is an edkm Hugging Face folder (``config.json`` naming the ``edkm``
quantization method, :data:`FOLDER_WEIGHTS`, tokenizer files, model card) plus the run's own files
(:data:`SETTINGS_FILE`, :data:`PROGRESS_FILE`, :data:`REPORT_FILE`, :data:`CHECKPOINTS`). Older runs wrote a
single packed file, :data:`PACKED_FILE`, instead of the folder's weights.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "config.json").write_text('{"quantization_config": {"quant_method": "edkm"}}')
    >>> is_edkm_folder(d), is_edkm_folder(d / "missing")
    (True, False)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FOLDER_WEIGHTS = "model.safetensors"  # the packed weights of an edkm Hugging Face folder
PACKED_FILE = "model.edkm.safetensors"  # a single packed file (what older edkm compress runs wrote into their folder)
SETTINGS_FILE = "settings.json"  # what decides a run's result, compared on --resume
PROGRESS_FILE = "progress.json"  # the phases a run has finished
REPORT_FILE = "report.json"  # the finished run's results
CHECKPOINTS = ("checkpoint_fp.pt", "checkpoint_fp.dcp", "checkpoint_edkm.pt", "checkpoint_edkm.dcp")  # .dcp: sharded
TOKENIZER_CONFIG = "tokenizer_config.json"


def is_edkm_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder whose ``config.json`` names the edkm quantization method."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        quant = json.loads(config.read_text()).get("quantization_config") or {}
        return isinstance(quant, dict) and quant.get("quant_method") == "edkm"
    except (ValueError, OSError, AttributeError, RecursionError):
        return False
