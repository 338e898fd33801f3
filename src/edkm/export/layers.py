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
from edkm.kernels import native
from edkm.kernels.layout import weight_rows_cols
from edkm.layers.lut import LUT_DTYPE, LUTModule, LUTWeight, compactable, uniform_levels


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


def build_lut(
    layer: PackedLayer, parts: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None, compact: bool = False
) -> LUTWeight:
    """The LUTWeight of validated ``parts``; decoded in ``dtype`` (default: the layer's).

    ``parts["packed"]`` (the native kernel's rows, from :mod:`edkm.export.stream`) instead of ``indices`` gives a
    compact weight; so does ``compact=True`` where the layer is :func:`~edkm.layers.lut.compactable` (the stored
    stream becomes kernel rows directly: no uint8 copy of the indices, ~b/8 bytes per weight at any time).
    """
    dtype = dtype or layer.dtype
    shape = torch.Size(layer.shape)
    uniform = (parts["lo"].float(), parts["step"].float()) if layer.levels != "lut" else None
    lut = uniform_levels(*uniform, layer.bits) if uniform is not None else parts["lut"].to(LUT_DTYPE)
    fits = compactable(shape, layer.groups, dtype)
    packed = parts.get("packed")
    if packed is not None and not fits:  # rows read for the layer's dtype, decoded in one the kernel does not run
        indices = native.unpack(packed, layer.bits, weight_rows_cols(shape)[1])
        return LUTWeight(lut, indices.reshape(layer.groups, -1), shape, layer.bits, dtype, uniform)
    if packed is None and compact and fits and parts["indices"].device.type == "cpu":
        packed = native_rows(layer, parts["indices"])
    if packed is not None:
        return LUTWeight.from_rows(lut, packed, shape, layer.bits, dtype, uniform)
    indices = unpack_bits(parts["indices"], layer.bits, layer.numel).reshape(layer.groups, -1)
    return LUTWeight(lut, indices, shape, layer.bits, dtype, uniform)


def native_rows(layer: PackedLayer, stream: torch.Tensor) -> torch.Tensor:
    """The native kernel's rows of a layer's densely packed ``indices`` stream."""
    rows, cols = weight_rows_cols(torch.Size(layer.shape))
    out = torch.empty(rows, native.stride(layer.bits, cols), dtype=torch.uint8)
    return native.pack_dense(stream, layer.bits, cols, out)


def canonical_json(data: Any) -> bytes:
    """One byte string per JSON value (sorted keys, no spaces): what the checksum covers of a header."""
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def digest(tensors: Mapping[str, torch.Tensor], header: Any = None) -> str:
    """sha256 over every tensor's name and bytes in key order; with ``header`` (format version 3 on)
    also over ``canonical_json(header)`` and every tensor's dtype and shape."""
    return digest_items(((key, tensors[key]) for key in sorted(tensors)), header)


def digest_items(items: Iterable[tuple[str, torch.Tensor]], header: Any = None) -> str:
    """:func:`digest` of (key, tensor) pairs given in key order, one tensor in memory at a time."""
    h = digest_start(header)
    for key, tensor in items:
        digest_update(h, key, tensor.dtype, tuple(tensor.shape), [tensor_bytes(tensor)], header is not None)
    return h.hexdigest()


def digest_start(header: Any = None) -> Any:
    """A sha256 over ``canonical_json(header)`` (nothing without one), for :func:`digest_update`."""
    h = hashlib.sha256()
    if header is not None:
        h.update(canonical_json(header))
    return h


def digest_update(
    h: Any, key: str, dtype: torch.dtype, shape: tuple[int, ...], chunks: Iterable[Any], typed: bool
) -> None:
    """Add one tensor to :func:`digest`'s hash: its name, (``typed``: format 3 on) dtype and shape, then its
    bytes, given in consecutive ``chunks`` (so a reader can hash a tensor it never holds whole)."""
    h.update(key.encode())
    if typed:
        h.update(f"{dtype}{list(shape)}".encode())
    for chunk in chunks:
        h.update(chunk)


def tensor_bytes(tensor: torch.Tensor) -> Any:
    """A tensor's bytes in memory order (what the checksum covers), as a buffer (no copy of a contiguous tensor)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
