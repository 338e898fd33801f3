"""Core ML export of a finalized edkm model, carrying our exact LUTs (``edkm export coreml``).

Needs the optional ``coreml`` extra (coremltools). Importing this package imports nothing heavy.

Example (``edkm export coreml runs/x --out model.mlpackage``, ``runs/x`` written by ``edkm compress --out``)::

    import edkm
    from edkm.coreml import export_coreml, verify_mlpackage
    model = edkm.load_palettized("runs/x")   # or transformers.AutoModelForCausalLM.from_pretrained("runs/x")
    export_coreml(model, "model.mlpackage", target="ios18")
    report = verify_mlpackage("model.mlpackage", model)   # LUT ops, index bits, bit-exact weights, sizes
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "export_coreml": "edkm.coreml.convert",
    "verify_mlpackage": "edkm.coreml.verify",
    "lut_ops": "edkm.coreml.verify",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edkm.coreml' has no attribute {name!r}")
