"""The packed single-file format: one safetensors file, validated before anything is built, written atomically.

Tensors: ``<layer>.lut`` (fp16, (G, 2^b)) and ``<layer>.indices`` (uint8, b-bit values packed
densely, see :mod:`edkm.export.pack`) for every clustered weight, plus every other tensor of the
model's state dict as it is. Evenly spaced levels (round-to-nearest) are stored as ``<layer>.lo``
and ``<layer>.step`` (fp32, (G, 1)) instead of the LUT. The safetensors metadata holds one JSON
header under ``"edkm"``::

    {"format": "edkm-palettized", "version": 3,
     "layers": {name: {"bits", "shape", "groups", "dtype", "levels": "lut" | "uniform" | "uniform16",
                       "modules": [tied module names, the first is name]}},
     "aliases": {state-dict key: key it shares storage with},
     "model_config": Hugging Face config dict or null, "palettize_config": ... or null,
     "sha256": digest of the rest of the header and every tensor's bytes in key order}

Version 3 made the checksum cover the header; versions 1 and 2 (checksum over tensors only) still
load. Any damaged or crafted file raises :class:`~edkm.export.errors.FormatError` naming the problem.
A file with a Hugging Face config loads through transformers' ``from_pretrained`` with the
``edkm`` quantizer: the model is built on the meta device, no fp32 weight is materialised.

Example:
    >>> import torch, edkm, tempfile, os
    >>> model = edkm.rtn_(torch.nn.Sequential(torch.nn.Linear(16, 8)), edkm.PalettizeConfig(bits=3))
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> edkm.save_palettized(model, path)
    >>> loaded = edkm.load_palettized(path, torch.nn.Sequential(torch.nn.Linear(16, 8)))
    >>> x = torch.randn(2, 16); torch.equal(loaded(x), model(x))
    True
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from edkm.atomic import atomic_path
from edkm.export.errors import FormatError
from edkm.export.files import is_edkm_folder
from edkm.export.layers import build_lut, describe, digest, lut_layers, packed_parts
from edkm.export.validate import (
    PackedLayer,
    check_aliases,
    check_finite,
    check_int,
    check_layout,
    check_tensor,
    parse_layers,
)
from edkm.layers.base import set_submodule
from edkm.layers.lut import LUTModule

FORMAT = "edkm-palettized"
VERSION = 3  # 3: the checksum covers the header; 2: uniform levels stored as lo + step; 1: LUTs only


def save_palettized(model: nn.Module, path: str | os.PathLike) -> None:
    """Write a finalized model (see :func:`edkm.finalize_`) to ``path`` atomically."""
    layers = lut_layers(model)
    if not layers:
        raise ValueError("the model has no LUT layers: call edkm.finalize_ (or ptq_kmeans_/rtn_) before saving")
    tensors: dict[str, torch.Tensor] = {}
    header: dict[str, Any] = {"format": FORMAT, "version": VERSION, "layers": {}, "aliases": {}}
    for name, (lut, names) in layers.items():
        tensors.update({f"{name}.{part}": value for part, value in packed_parts(lut).items()})
        header["layers"][name] = describe(lut, names).to_json()
    lut_keys = tuple(f"{n}.lut." for _, names in layers.values() for n in names)
    seen: dict[tuple[int, tuple[int, ...], torch.dtype], str] = {}
    for key, value in model.state_dict().items():
        if key.startswith(lut_keys):
            continue
        ident = (
            value.untyped_storage().data_ptr() + value.storage_offset() * value.element_size(),
            tuple(value.shape),
            value.dtype,
        )
        if ident in seen and value.numel():
            header["aliases"][key] = seen[ident]
        else:
            seen[ident] = key
            tensors[key] = value.detach().cpu().contiguous()
    config = getattr(model, "edkm_config", None)
    hf_config = getattr(model, "config", None)
    header["model_config"] = hf_config.to_dict() if hasattr(hf_config, "to_dict") else None
    if header["model_config"] is not None:
        header["model_config"].pop("quantization_config", None)  # the layers say it all
    header["palettize_config"] = config.to_dict() if config is not None else None
    header["sha256"] = digest(tensors, header)
    with atomic_path(path) as tmp:
        # called through the module, so a test can make it fail
        safetensors.torch.save_file(tensors, tmp, metadata={"edkm": json.dumps(header)})


@dataclass
class PackedFile:
    """A single-file model whose header is validated against its tensor table (nothing loaded yet)."""

    path: Path
    header: dict[str, Any]
    layers: dict[str, PackedLayer]
    aliases: dict[str, str]
    table: dict[str, tuple[str, tuple[int, ...]]]

    def checksum_ok(self, tensors: dict[str, torch.Tensor]) -> bool:
        if self.header["version"] < 3:
            return digest(tensors) == self.header["sha256"]
        return digest(tensors, {k: v for k, v in self.header.items() if k != "sha256"}) == self.header["sha256"]


def inspect_file(path: str | os.PathLike) -> PackedFile:
    """Read and validate a packed file's header and tensor table; FormatError for anything wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no packed edkm model at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            table = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise FormatError(f"{path} is not a readable safetensors file (corrupted or truncated?): {err}") from err
    if "edkm" not in metadata:
        hint = (
            f": it is the weights file of the edkm folder {path.parent}, load the folder"
            if is_edkm_folder(path.parent)
            else ""
        )
        raise FormatError(f"{path} is a safetensors file but not an edkm packed model (no 'edkm' header){hint}")
    try:
        header = json.loads(metadata["edkm"])
    except (ValueError, RecursionError) as err:
        raise FormatError(f"{path}: the edkm header is not valid JSON: {err}") from err
    if not isinstance(header, dict):
        raise FormatError(f"{path}: the edkm header must be a JSON object")
    if header.get("format") != FORMAT:
        raise FormatError(f"{path}: unknown format {header.get('format')!r}, expected {FORMAT!r}")
    version = check_int(header.get("version"), "version", 1, 1 << 30, str(path))
    if version > VERSION:
        raise FormatError(f"{path} has format version {version}, newer than this edkm reads ({VERSION}); upgrade edkm")
    layers = parse_layers(header.get("layers"), str(path), "lut" if version == 1 else None)
    lut_keys = set()
    for name, layer in layers.items():
        if layer.modules[0] != name:
            raise FormatError(f"{path}: layer {name!r} must list itself first in modules, got {list(layer.modules)}")
        for part, (dtype, shape) in layer.tensor_specs().items():
            check_tensor(f"{name}.{part}", table, dtype, shape, str(path))
            lut_keys.add(f"{name}.{part}")
    aliases = check_aliases(header.get("aliases", {}), set(table) - lut_keys, str(path))
    for key in ("model_config", "palettize_config"):
        if header.get(key) is not None and not isinstance(header[key], dict):
            raise FormatError(f"{path}: {key} must be an object or null")
    if not isinstance(header.get("sha256"), str):
        raise FormatError(f"{path}: the header has no sha256 checksum")
    return PackedFile(path, header, layers, aliases, table)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a packed file, validated; FormatError for anything else."""
    return inspect_file(path).header


def read_packed(path: str | os.PathLike) -> tuple[PackedFile, dict[str, torch.Tensor]]:
    """The validated header and tensors of a packed file (checksum and finiteness checked); FormatError if damaged."""
    packed = inspect_file(path)
    try:
        tensors = load_file(path)
    except Exception as err:
        raise FormatError(f"{path}: cannot read tensors (corrupted or truncated?): {err}") from err
    if not packed.checksum_ok(tensors):
        raise FormatError(f"{path}: checksum mismatch, the file is corrupted")
    for name, layer in packed.layers.items():
        check_finite(layer, {part: tensors[f"{name}.{part}"] for part in layer.tensor_specs()}, str(path))
    return packed, tensors


def load_into(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load the packed file ``path`` into ``model`` (its LUT layers replace the saved ones); returns ``model``.

    ``edkm.load_palettized`` (:mod:`edkm.hf.load`) also builds a Hugging Face model when none is given.
    """
    packed, tensors = read_packed(path)
    check_layout(model, packed.layers, packed.table, str(path), "", packed.aliases)
    for name, layer in packed.layers.items():
        first = model.get_submodule(name)
        dtype = first.lut.dtype if isinstance(first, LUTModule) else first.weight.dtype  # decode in the model's dtype
        lut = build_lut(layer, {part: tensors.pop(f"{name}.{part}") for part in layer.tensor_specs()}, dtype)
        for module_name in layer.modules:
            base = model.get_submodule(module_name)
            base = base if isinstance(base, LUTModule) else LUTModule(base, lut)
            base.lut = lut
            set_submodule(model, module_name, base)
    for alias, key in packed.aliases.items():
        tensors[alias] = tensors[key]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [k for k in missing if ".lut." not in k]
    if missing or unexpected:
        raise FormatError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model
