"""Hugging Face integration: ``quant_method: "edkm"`` for ``from_pretrained`` and ``save_pretrained``.

``import edkm`` makes ``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` load an edkm folder
without importing transformers itself: :func:`install_import_hook` registers the quantizer the
moment transformers loads its quantizer registry (``transformers.quantizers.auto``), or at once
when that is already loaded. :func:`register` does it explicitly.

Example:
    >>> import edkm.hf
    >>> edkm.hf.register()
    >>> from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    >>> AUTO_QUANTIZER_MAPPING["edkm"].__name__
    'EdkmHfQuantizer'
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from importlib import import_module
from types import ModuleType
from typing import Any

REGISTRY_MODULE = "transformers.quantizers.auto"
QUANTIZER_MODULE = "edkm.hf.quantizer"

__all__ = ["register", "install_import_hook"]


def register() -> None:
    """Register the edkm quantization config and quantizer with transformers (idempotent)."""
    module = sys.modules.get(QUANTIZER_MODULE)
    if module is None:
        import_module(QUANTIZER_MODULE)  # registers at the end of its import
    elif hasattr(module, "register_with_transformers"):
        module.register_with_transformers()
    # else: that module is being imported (it loaded transformers' registry) and registers when it finishes


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of the registry module so that :func:`register` runs after it."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> Any:
        if fullname != REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)  # one shot: the registry loads once per process
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run_module = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            register()

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def install_import_hook() -> None:
    """Register now if transformers' quantizer registry is loaded, else as soon as it loads (cheap; no import)."""
    if REGISTRY_MODULE in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
