"""GPTQModel's saved folders (GPTQ v1 and AWQ GEMM formats) read into our LUT layers, without GPTQModel.

GPTQModel pins numpy and torch versions edkm's environment does not hold, so it quantizes in its own venv
(``benchmarks/gptqmodel_quantize.py``) and this module reads what it saved: every quantized linear becomes a
:class:`~edkm.layers.lut.LUTWeight` whose levels are the library's own dequantized values (exact: one fp16
product per level, as its kernels compute them), every other tensor it saved (AWQ folds its scales into the
norms) replaces the model's. Written by hand because nothing installed here reads these packed formats
without GPTQModel itself (transformers' GPTQ/AWQ loading calls into it).

Formats (``quantize_config.json``): GPTQ ``checkpoint_format: gptq``: ``qweight`` (in * bits / 32, out) int32,
the input column's codes as one little-endian bit stream per output column (3 bits: 32 codes in 3 words),
``qzeros`` (groups, out * bits / 32) the same along columns, stored minus one, ``scales`` (groups, out),
``g_idx`` (in,) the group of each input column; level = scale * (code - (zero + 1)). AWQ ``gemm``: ``qweight``
(in, out / 8) and ``qzeros`` (groups, out / 8) with 4-bit codes in AWQ's interleaved order, level =
scale * (code - zero). Groups must be consecutive input columns (``desc_act=False``): our LUT layers' groups.
A group size that does not divide the input width (SmolLM2's 576 at g128) is held as LUTs of
gcd(group, width) columns that repeat the library's group's levels: the same weights; the bits a row reports
come from the library's file (:func:`saved_bits`).

Example:
    >>> import torch
    >>> codes = torch.tensor([[5], [0], [7]])  # three 3-bit codes of one output column
    >>> unpack_rows(pack_rows_for_test(codes, 3), 3, 3).flatten().tolist()
    [5, 0, 7]
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edkm.config import PalettizeConfig
from edkm.layers.lut import LUT_DTYPE, LUTWeight
from edkm.peers.calibrate import quantize_layers_
from edkm.peers.gptq import rtn_lut

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the output column of each 4-bit slot of an AWQ GEMM word
PARTS = ("qweight", "qzeros", "scales", "g_idx")


def unpack_rows(packed: torch.Tensor, bits: int, rows: int) -> torch.Tensor:
    """Codes (rows, cols) int64 of int32 words (words, cols) holding each column as a little-endian bit stream."""
    shifts = torch.arange(32, dtype=torch.int64)
    stream = (packed.to(torch.int64).unsqueeze(1) >> shifts.view(1, 32, 1)) & 1  # (words, 32, cols)
    stream = stream.reshape(-1, packed.shape[1])[: rows * bits].reshape(rows, bits, -1)
    return (stream << torch.arange(bits, dtype=torch.int64).view(1, bits, 1)).sum(1)


def pack_rows_for_test(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of :func:`unpack_rows` (tests and examples only; GPTQModel packs the real files)."""
    rows, cols = codes.shape
    stream = ((codes.to(torch.int64).unsqueeze(1) >> torch.arange(bits).view(1, bits, 1)) & 1).reshape(-1, cols)
    stream = torch.cat([stream, stream.new_zeros(-stream.shape[0] % 32, cols)]).reshape(-1, 32, cols)
    words = (stream << torch.arange(32, dtype=torch.int64).view(1, 32, 1)).sum(1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """4-bit codes (rows, 8 * words) int64 of AWQ GEMM words (rows, words), columns in their natural order."""
    slots = (packed.to(torch.int64).unsqueeze(-1) >> (4 * torch.arange(8))) & 15  # (rows, words, 8)
    codes = torch.empty_like(slots)
    codes[..., list(AWQ_ORDER)] = slots
    return codes.reshape(packed.shape[0], -1)


def read_config(folder: str | Path) -> dict[str, Any]:
    """The folder's ``quantize_config.json``, refused with one line if its format is not one we read."""
    path = Path(folder) / "quantize_config.json"
    if not path.is_file():
        raise ValueError(f"{folder} has no quantize_config.json: pass the folder GPTQModel's model.save() wrote")
    cfg = json.loads(path.read_text())
    fmt = (cfg.get("method"), cfg.get("checkpoint_format", cfg.get("format")))
    if fmt not in (("gptq", "gptq"), ("awq", "gemm")):
        raise ValueError(f"{folder}: GPTQModel format {fmt} is not read here; save GPTQ as 'gptq' or AWQ as 'gemm'")
    if cfg.get("desc_act"):
        raise ValueError(
            f"{folder}: desc_act=True reorders groups, which LUT layers cannot hold; quantize with desc_act=False"
        )
    return cfg


def read_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files (one file or shards)."""
    from safetensors.torch import load_file  # deferred: safetensors loads with the hf extra

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has no .safetensors file: pass the folder GPTQModel's model.save() wrote")
    return {k: v for f in files for k, v in load_file(f).items()}


def layer_codes(tensors: dict[str, torch.Tensor], prefix: str, cfg: dict[str, Any], shape: torch.Size):
    """(codes (out, in), zeros (groups, out), scales (groups, out) fp32, group size) of one saved layer."""
    out_features, in_features = shape
    bits, parts = cfg["bits"], {p: tensors.get(f"{prefix}.{p}") for p in PARTS}
    group = cfg["group_size"] if cfg["group_size"] > 0 else in_features
    groups = math.ceil(in_features / group)
    if parts["qweight"] is None or parts["scales"] is None or parts["scales"].shape != (groups, out_features):
        raise ValueError(f"{prefix}: its saved tensors do not fit the model's {tuple(shape)} weight")
    if cfg["method"] == "awq":
        codes, zeros = unpack_awq(parts["qweight"]).t(), unpack_awq(parts["qzeros"])
    else:
        codes = unpack_rows(parts["qweight"], bits, in_features).t()
        zeros = unpack_rows(parts["qzeros"].t().contiguous(), bits, out_features).t() + 1  # stored minus one
        expected = torch.arange(in_features) // group
        if parts["g_idx"] is not None and not torch.equal(parts["g_idx"].long(), expected):
            raise ValueError(f"{prefix}: its groups are not consecutive input columns; quantize with desc_act=False")
    if codes.shape != (out_features, in_features) or zeros.shape != (groups, out_features):
        raise ValueError(f"{prefix}: its saved tensors do not fit the model's {tuple(shape)} weight")
    return codes, zeros, parts["scales"].float(), group


def library_lut(tensors: dict[str, torch.Tensor], prefix: str, cfg: dict[str, Any], weight: torch.Tensor) -> LUTWeight:
    """The LUTWeight of one saved layer: the library's levels scale * (code - zero), rounded as its dtype rounds."""
    codes, zeros, scales, group = layer_codes(tensors, prefix, cfg, weight.shape)
    out_features, in_features = weight.shape
    width = math.gcd(group, in_features)  # our groups: equal column ranges; a library group spans group / width
    owner = torch.arange(0, in_features, width) // group  # the library's group of each of our column ranges
    k = torch.arange(1 << cfg["bits"], dtype=torch.float32)
    levels = scales.unsqueeze(-1) * (k - zeros.float().unsqueeze(-1))  # (groups, out, 2^b), exact in fp32
    levels = levels.to(tensors[f"{prefix}.scales"].dtype).to(LUT_DTYPE)  # the library's rounding, then our LUT's
    lut = levels[owner].transpose(0, 1).reshape(-1, levels.shape[-1])  # (out * ranges, 2^b), row-major
    indices = codes.reshape(-1, width).to(torch.uint8)
    return LUTWeight(lut.contiguous(), indices, weight.shape, cfg["bits"], weight.dtype)


def quantized_prefixes(tensors: dict[str, torch.Tensor]) -> set[str]:
    """The module names that hold a saved ``qweight``."""
    return {k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")}


def load_gptqmodel_(model: nn.Module, folder: str | Path, config: PalettizeConfig) -> nn.Module:
    """``model`` (the fp model GPTQModel quantized) with the folder's layers as LUT layers, in place.

    The folder's other tensors (norms AWQ rescaled) replace the model's; target layers the library left
    unquantized (the embedding and tied head) get round-to-nearest per channel at their configured bits, as
    every other post-training peer row.
    """
    cfg, tensors = read_config(folder), read_tensors(folder)
    quantized = quantized_prefixes(tensors)
    state = model.state_dict()
    plain = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in quantized}
    for k, v in sorted(plain.items()):
        if k not in state or state[k].shape != v.shape:
            raise ValueError(
                f"{folder}'s {k} {tuple(v.shape)} is not in the model: pass the model it was quantized from"
            )
    with torch.no_grad():
        for k, v in plain.items():
            state[k].copy_(v.to(state[k].dtype))

    def make_lut(name: str, module: nn.Module, _stats: dict[str, torch.Tensor]) -> LUTWeight:
        if name in quantized:
            return library_lut(tensors, name, cfg, module.weight)
        return rtn_lut(module.weight, config.for_module(name).bits)

    return quantize_layers_(model, config, make_lut)


def saved_bits(folder: str | Path) -> dict[str, float]:
    """Bits per weight of the folder's quantized layers, from the saved tensors (codes, zero points, scales, and
    the group index GPTQ stores per input column), and without the group index (recomputable when desc_act is off).
    """
    tensors = read_tensors(folder)
    bits, weights = dict.fromkeys(PARTS, 0), 0
    for prefix in quantized_prefixes(tensors):
        for part in PARTS:
            t = tensors.get(f"{prefix}.{part}")
            bits[part] += 0 if t is None else t.numel() * t.element_size() * 8
        weights += tensors[f"{prefix}.scales"].shape[1] * _in_features(tensors, prefix)
    total = sum(bits.values())
    return {"bits_per_weight": total / weights, "without_g_idx": (total - bits["g_idx"]) / weights}


def _in_features(tensors: dict[str, torch.Tensor], prefix: str) -> int:
    """A saved layer's input width: its group index's length, or (AWQ) its codes' rows."""
    g_idx = tensors.get(f"{prefix}.g_idx")
    return g_idx.numel() if g_idx is not None else tensors[f"{prefix}.qweight"].shape[0]


__all__ = ["library_lut", "load_gptqmodel_", "read_config", "read_tensors", "saved_bits", "unpack_awq", "unpack_rows"]
