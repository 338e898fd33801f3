"""Bits per weight read back from a saved packed file (indices, LUTs, scales and zero points counted).

Example::

    save_palettized(model, "m.safetensors")
    bits_per_weight("m.safetensors")  # {"3": 3.03, "8": 8.13, "file_bytes": ...}
"""

from __future__ import annotations

import os
from typing import Any

from safetensors import safe_open

from edkm.export.format import read_header

PARTS = ("indices", "lut", "lo", "step")


def bits_per_weight(path: str | os.PathLike) -> dict[str, Any]:
    """Per clustered bit width: stored bits of its layers (indices + LUTs / scales / zero points) per weight.

    Keys: the bit widths as strings (e.g. ``"3"``: the decoder layers, ``"8"``: the embedding),
    plus ``file_bytes`` (the whole file) and ``weights`` (clustered weights per bit width).
    """
    header = read_header(path)
    stored: dict[str, int] = {}
    weights: dict[str, int] = {}
    with safe_open(path, framework="pt") as f:
        keys = set(f.keys())
        for name, layer in header["layers"].items():
            b = str(layer["bits"])
            n = 1
            for s in layer["shape"]:
                n *= s
            weights[b] = weights.get(b, 0) + n
            for part in PARTS:
                key = f"{name}.{part}"
                if key in keys:
                    t = f.get_slice(key)
                    count = 1
                    for s in t.get_shape():
                        count *= s
                    stored[b] = stored.get(b, 0) + count * _itemsize(t.get_dtype()) * 8
    out: dict[str, Any] = {b: stored[b] / weights[b] for b in sorted(weights, key=int)}
    out["weights"] = weights
    out["file_bytes"] = os.path.getsize(path)
    return out


def _itemsize(dtype: str) -> int:
    sizes = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "I16": 2, "F32": 4, "I32": 4, "F64": 8, "I64": 8}
    if dtype not in sizes:
        raise ValueError(f"unexpected tensor dtype {dtype!r} in a packed file")
    return sizes[dtype]
