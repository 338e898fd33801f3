"""What can be checked of a Core ML package on Linux (prediction needs macOS): its LUT ops and their weights.

``lut_ops`` reads the saved ML program back (``ct.utils.load_spec`` and the weight blob) and decodes every
``constexpr_lut_to_dense``; ``verify_mlpackage`` matches them one to one against a finalized model's
clustered tensors: same index bit width, same LUT, and the decoded fp16 weights equal bit for bit.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edkm.cluster import decode
from edkm.coreml.convert import import_coremltools
from edkm.coreml.layers import ios16_lut_size
from edkm.layers.lut import LUTModule

WEIGHTS_DIR = Path("Data", "com.apple.CoreML", "weights")  # the weight blobs inside a .mlpackage


def package_bytes(path: str | os.PathLike) -> int:
    """Total size of the files in a .mlpackage folder."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def lut_ops(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every ``constexpr_lut_to_dense`` of the package's program: name, index bits, LUT and decoded weight."""
    ct = import_coremltools()
    # deferred: coremltools is the coreml extra, loaded only when a package is verified
    from coremltools.converters.mil.frontend.milproto.load import load as load_program
    from coremltools.converters.mil.mil import types

    path = Path(path)
    if not (path / "Manifest.json").is_file():
        raise FileNotFoundError(f"no Core ML package at {path}")
    spec = ct.utils.load_spec(str(path))
    program = load_program(spec, spec.specificationVersion, str(path / WEIGHTS_DIR))
    found = []

    def walk(block: Any) -> None:
        for op in block.operations:
            if op.op_type == "constexpr_lut_to_dense":
                weight, lut = decoded_weight(op), np.asarray(op.lut.val)
                if op.indices.shape == weight.shape:  # iOS 18: one uint<b> index per weight
                    bits = int(types.builtin_to_string(op.indices.dtype).removeprefix("uint"))
                else:  # iOS 16: indices packed into uint8 bytes, b = log2(LUT entries)
                    bits = lut.size.bit_length() - 1
                    if op.indices.shape[0] != -(-weight.size * bits // 8):
                        raise ValueError(
                            f"{op.name}: {op.indices.shape[0]} index bytes do not hold {weight.size} {bits}-bit indices"
                        )
                found.append({"name": op.name, "index_bits": bits, "lut": lut, "weight": weight})
            for inner in op.blocks:
                walk(inner)

    for function in program.functions.values():
        walk(function)
    return found


def decoded_weight(op: Any) -> np.ndarray:
    """The dense weight of a ``constexpr_lut_to_dense`` op. iOS 18 scalar LUTs ([groups per axis..., k, 1]) are
    decoded here, by indexing: coremltools' ``materialized_val_inference`` first repeats the LUT to the weight's shape
    times its k entries (14.5 GB for SmolLM2's 49,152 x 576 head at 8 bits). Other forms: coremltools' own."""
    indices, lut = np.asarray(op.indices.val), np.asarray(op.lut.val)
    if lut.ndim != indices.ndim + 2 or lut.shape[-1] != 1:  # iOS 16 (packed indices, one LUT) or vector LUTs
        return np.asarray(op.materialized_val_inference())
    groups = np.ix_(*(np.arange(n) // (n // g) for n, g in zip(indices.shape, lut.shape[:-2])))
    return lut[..., 0][(*groups, indices)]


def _our_tensors(model: nn.Module) -> list[tuple[str, LUTModule]]:
    seen: dict[int, tuple[str, LUTModule]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, LUTModule):
            seen.setdefault(id(module.lut), (name, module))
    return list(seen.values())


def verify_mlpackage(path: str | os.PathLike, model: nn.Module, target: str = "ios18") -> dict[str, Any]:
    """Check the package against the finalized ``model``; returns the report (``ok`` True when everything matches).

    Each clustered tensor must have exactly one LUT op with ``uint<b>`` indices (iOS 16: the padded LUT's width),
    our LUT (iOS 16: padded with copies of its last entry) and a decoded weight equal to ours bit for bit.
    """
    ops = lut_ops(path)
    unused = list(range(len(ops)))
    problems: list[str] = []
    for name, module in _our_tensors(model):
        lut = module.lut
        ours = module.rows_first(decode(lut.lut, lut.indices, lut.shape, torch.float16)).numpy()
        bits = lut.bits if target == "ios18" else ios16_lut_size(lut.bits).bit_length() - 1
        match = next(
            (
                i
                for i in unused
                if ops[i]["weight"].shape == ours.shape
                and np.array_equal(ops[i]["weight"].view(np.uint16), ours.view(np.uint16))
            ),
            None,
        )
        if match is None:
            problems.append(f"{name}: no LUT op decodes to our weight bit for bit")
            continue
        unused.remove(match)
        op = ops[match]
        if op["index_bits"] != bits:
            problems.append(f"{name}: {op['index_bits']}-bit indices, expected {bits}")
        if not np.array_equal(np.unique(op["lut"]), np.unique(lut.lut.numpy())):
            problems.append(f"{name}: the LUT entries differ from ours")
    problems += [f"{ops[i]['name']}: a LUT op matching none of our tensors" for i in unused]
    return {
        "ok": not problems,
        "problems": problems,
        "target": target,
        "lut_ops": len(ops),
        "clustered_tensors": len(_our_tensors(model)),
        "index_bits": dict(Counter(op["index_bits"] for op in ops)),
        "mlpackage_bytes": package_bytes(path),
        "weights_bytes": package_bytes(Path(path) / WEIGHTS_DIR),
        "fp16_bytes": fp16_bytes(model),
    }


def fp16_bytes(model: nn.Module) -> int:
    """The model's weights at 16 bits (clustered tensors at their full size, tied tensors once)."""
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return 2 * (params + sum(module.lut.shape.numel() for _, module in _our_tensors(model)))
