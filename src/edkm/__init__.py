"""edkm: train-time weight clustering (DKM with the eDKM memory techniques) for LLMs.

Quickstart (prepare -> train -> finalize -> save -> load)::

    import edkm
    config = edkm.PalettizeConfig(bits=3, overrides={"embed_tokens|lm_head": {"bits": 8}})
    edkm.palettize_(model, config)          # soft clustering inside every targeted layer
    ...train with any optimizer and loop...
    edkm.finalize_(model)                   # hard LUT + indices
    edkm.save_folder(model, "out", tokenizer)  # Hugging Face folder (from_pretrained("out") after import edkm)
    edkm.save_palettized(model, "out/model.edkm.safetensors")  # or one packed file
    model = edkm.load_palettized("out")         # either

Importing edkm is instant: torch loads on first use of an attribute (no transformers, no CUDA
initialisation), so ``edkm --help`` and ``edkm --version`` answer without it. It registers the
``edkm`` quantization method with transformers lazily, when transformers loads its quantizer
registry, so ``AutoModelForCausalLM.from_pretrained(folder)`` works after ``import edkm``.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from edkm.hf import install_import_hook

install_import_hook()  # `from_pretrained` of an edkm folder works once transformers loads; imports nothing now

__version__ = "0.1.0"

_LAZY = {
    "dkm": "edkm.memory",
    "kmeans1d": "edkm.cluster",
    "hard_assign": "edkm.cluster",
    "decode": "edkm.cluster",
    "PalettizeConfig": "edkm.config",
    "palettize_": "edkm.transform",
    "finalize_": "edkm.transform",
    "ptq_kmeans_": "edkm.peers.baselines",
    "rtn_": "edkm.peers.baselines",
    "save_palettized": "edkm.export",
    "load_palettized": "edkm.hf.load",
    "save_folder": "edkm.hf.folder",
}

__all__ = [*_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edkm' has no attribute {name!r}")
