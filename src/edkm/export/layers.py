"""What a finalized model stores per clustered tensor, shared by the single-file and folder formats.

``lut_layers`` finds the LUT layers (tied modules share one), ``packed_parts`` gives the tensors a
layer is stored as (fp16 LUT or fp32 min + step, densely packed indices), ``build_lut`` rebuilds a
:class:`~edkm.layers.lut.LUTWeight` from them, and ``digest`` is the checksum over header and tensors.

Example:
    >>> import torch
    >>> from edkm.layers.lut import LUTWeight
    >>> from edkm.export.layers import packed_parts, build_lut
    >>> from edkm.export.validate import PackedLayer
    >>> lut = LUTWeight(
    ...     torch.randn(1, 4).half(), torch.randint(0, 4, (1, 6), dtype=torch.uint8), (2, 3), 2, torch.float32
    ... )
    >>> layer = PackedLayer("fc", 2, (2, 3), 1, torch.float32, "lut", ("fc",))
    >>> torch.equal(build_lut(layer, packed_parts(lut))(), lut())
    True
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from edkm.export.pack import pack_bits, unpack_bits
from edkm.export.validate import PackedLayer
from edkm.layers.lut import LUT_DTYPE, LUTModule, LUTWeight


def lut_layers(model: nn.Module) -> dict[str, tuple[LUTWeight, list[str]]]:
    """First module name -> (LUTWeight, every module name using it), in ``named_modules`` order."""
    layers: dict[int, tuple[str, LUTWeight, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, LUTModule):
            layers.setdefault(id(module.lut), (name, module.lut, []))[2].append(name)
    return {name: (lut, names) for name, lut, names in layers.values()}


def describe(lut: LUTWeight, names: list[str]) -> PackedLayer:
    """The header entry of a LUT layer."""
    return PackedLayer(
        names[0], lut.bits, tuple(lut.shape), lut.lut.shape[0], lut.dtype, level_format(lut), tuple(names)
    )


def level_format(lut: LUTWeight) -> str:
    """How the levels are stored: ``lut`` (fp16 table), ``uniform`` (fp32 lo + step), ``uniform16`` (fp16 lo + step)."""
    if not lut.uniform:
        return "lut"
    return "uniform16" if lut.lo.dtype == torch.float16 and lut.step.dtype == torch.float16 else "uniform"


def packed_parts(lut: LUTWeight) -> dict[str, torch.Tensor]:
    """part -> tensor as stored: ``lut`` (or ``lo`` and ``step``) and packed ``indices``."""
    scale = torch.float16 if level_format(lut) == "uniform16" else torch.float32
    levels = {"lo": lut.lo.to(scale), "step": lut.step.to(scale)} if lut.uniform else {"lut": lut.lut}
    parts = {part: value.detach().cpu().contiguous() for part, value in levels.items()}
    parts["indices"] = pack_bits(lut.indices.cpu(), lut.bits)
    return parts


def build_lut(layer: PackedLayer, parts: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> LUTWeight:
    """The LUTWeight of validated ``parts``; decoded in ``dtype`` (default: the layer's)."""
    indices = unpack_bits(parts["indices"], layer.bits, layer.numel).reshape(layer.groups, -1)
    dtype = dtype or layer.dtype
    if layer.levels != "lut":
        lo, step = parts["lo"].float(), parts["step"].float()
        return LUTWeight.from_uniform(lo, step, indices, torch.Size(layer.shape), layer.bits, dtype)
    return LUTWeight(parts["lut"].to(LUT_DTYPE), indices, torch.Size(layer.shape), layer.bits, dtype)


def canonical_json(data: Any) -> bytes:
    """One byte string per JSON value (sorted keys, no spaces): what the checksum covers of a header."""
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def digest(tensors: Mapping[str, torch.Tensor], header: Any = None) -> str:
    """sha256 over every tensor's name and bytes in key order; with ``header`` (format version 3 on)
    also over ``canonical_json(header)`` and every tensor's dtype and shape."""
    return digest_items(((key, tensors[key]) for key in sorted(tensors)), header)


def digest_items(items: Iterable[tuple[str, torch.Tensor]], header: Any = None) -> str:
    """:func:`digest` of (key, tensor) pairs given in key order, one tensor in memory at a time."""
    h = hashlib.sha256()
    if header is not None:
        h.update(canonical_json(header))
    for key, tensor in items:
        h.update(key.encode())
        if header is not None:
            h.update(f"{tensor.dtype}{list(tensor.shape)}".encode())
        h.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
