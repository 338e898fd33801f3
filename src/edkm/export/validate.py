"""Validation of packed-model headers against the tensors a file really holds, before anything is built.

Every field is checked: types and ranges, bits against the LUT size (the LUT has exactly 2^bits
entries, so every unpacked index is in range), decode dtypes from an allow-list, shapes, group
counts and packed byte lengths consistent, module names unique. A problem raises
:class:`~edkm.export.errors.FormatError` naming the file and the field.

Example:
    >>> from edkm.export.validate import parse_layers
    >>> layers = parse_layers({"fc": {"bits": 3, "shape": [4, 8], "groups": 1, "dtype": "float32",
    ...                               "levels": "lut", "modules": ["fc"]}}, "m.safetensors")
    >>> layers["fc"].numel, layers["fc"].tensor_specs()["indices"]
    (32, ('U8', (12,)))
    >>> parse_layers({"fc": {"bits": 9}}, "m.safetensors")
    Traceback (most recent call last):
    ...
    edkm.export.errors.FormatError: m.safetensors: layer 'fc': bits must be an integer from 1 to 8, got 9
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edkm.export.errors import FormatError
from edkm.export.pack import packed_nbytes
from edkm.layers.base import layer_kind, rows_first_weight
from edkm.layers.lut import LUTModule

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # decode dtypes allowed
LEVELS = ("lut", "uniform", "uniform16")  # fp16 LUT; fp32 lo + step; fp16 lo + step (group-wise scales)
MAX_DIMS = 8
MAX_NUMEL = 1 << 40


def check_int(value: Any, what: str, lo: int, hi: int, where: str) -> int:
    """``value`` as an int in [lo, hi] (bools refused), else a FormatError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise FormatError(f"{where}: {what} must be an integer from {lo} to {hi}, got {value!r}")
    return value


def check_str(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise FormatError(f"{where}: {what} must be a non-empty string, got {value!r}")
    return value


@dataclass(frozen=True)
class PackedLayer:
    """One validated clustered tensor of a header."""

    name: str
    bits: int
    shape: tuple[int, ...]
    groups: int
    dtype: torch.dtype
    levels: str
    modules: tuple[str, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def tensor_specs(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """part -> (safetensors dtype, shape) of the tensors stored for this layer."""
        if self.levels == "lut":
            levels = {"lut": ("F16", (self.groups, 1 << self.bits))}
        else:
            scale = "F16" if self.levels == "uniform16" else "F32"
            levels = {"lo": (scale, (self.groups, 1)), "step": (scale, (self.groups, 1))}
        return {**levels, "indices": ("U8", (packed_nbytes(self.numel, self.bits),))}

    def to_json(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "shape": list(self.shape),
            "groups": self.groups,
            "dtype": str(self.dtype).removeprefix("torch."),
            "levels": self.levels,
            "modules": list(self.modules),
        }


def parse_layer(name: str, spec: Any, where: str, default_levels: str | None = None) -> PackedLayer:
    """Validate one header entry (``default_levels`` fills a missing ``levels``, for version-1 files)."""
    at = f"{where}: layer {name!r}"
    if not isinstance(spec, Mapping):
        raise FormatError(f"{at}: expected an object, got {type(spec).__name__}")
    bits = check_int(spec.get("bits"), "bits", 1, 8, at)
    shape = spec.get("shape")
    if not isinstance(shape, list) or not 1 <= len(shape) <= MAX_DIMS:
        raise FormatError(f"{at}: shape must be a list of 1 to {MAX_DIMS} sizes, got {shape!r}")
    shape = tuple(check_int(s, "every shape entry", 1, MAX_NUMEL, at) for s in shape)
    numel = math.prod(shape)
    if numel > MAX_NUMEL:
        raise FormatError(f"{at}: shape {list(shape)} has {numel} elements, more than any real weight")
    groups = check_int(spec.get("groups"), "groups", 1, numel, at)
    if numel % groups:
        raise FormatError(f"{at}: {groups} groups do not divide the {numel} weights of shape {list(shape)}")
    dtype = spec.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise FormatError(f"{at}: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    levels = spec.get("levels", default_levels)
    if not isinstance(levels, str) or levels not in LEVELS:
        raise FormatError(f"{at}: levels must be one of {list(LEVELS)}, got {levels!r}")
    modules = spec.get("modules")
    if not isinstance(modules, list) or not modules:
        raise FormatError(f"{at}: modules must be a non-empty list of module names, got {modules!r}")
    modules = tuple(check_str(m, "every module name", at) for m in modules)
    if len(set(modules)) != len(modules):
        raise FormatError(f"{at}: module names repeat: {list(modules)}")
    return PackedLayer(name, bits, shape, groups, DTYPES[dtype], levels, modules)


def parse_layers(layers: Any, where: str, default_levels: str | None = None) -> dict[str, PackedLayer]:
    """Validate the ``layers`` object of a header; every module belongs to one layer only."""
    if not isinstance(layers, Mapping) or not layers:
        raise FormatError(f"{where}: 'layers' must be a non-empty object, got {layers!r}")
    parsed = {check_str(n, "a layer name", where): parse_layer(n, s, where, default_levels) for n, s in layers.items()}
    owner: dict[str, str] = {}
    for layer in parsed.values():
        for module in layer.modules:
            if owner.setdefault(module, layer.name) != layer.name:
                raise FormatError(
                    f"{where}: module {module!r} is listed by layers {owner[module]!r} and {layer.name!r}"
                )
    return parsed


def check_tensor(
    key: str, table: Mapping[str, tuple[str, tuple[int, ...]]], dtype: str, shape: tuple[int, ...], where: str
) -> None:
    """The file holds ``key`` with safetensors ``dtype`` and ``shape``."""
    if key not in table:
        raise FormatError(f"{where}: tensor {key!r} is missing")
    found = table[key]
    if found != (dtype, shape):
        raise FormatError(f"{where}: tensor {key!r} is {found[0]} {list(found[1])}, expected {dtype} {list(shape)}")


def check_aliases(aliases: Any, keys: set[str], where: str) -> dict[str, str]:
    """``aliases`` maps new keys to keys the file holds (no chains, no overlap with stored keys)."""
    if not isinstance(aliases, Mapping):
        raise FormatError(f"{where}: 'aliases' must be an object, got {type(aliases).__name__}")
    for alias, target in aliases.items():
        check_str(target, f"the target of alias {alias!r}", where)
        if alias in keys:
            raise FormatError(f"{where}: alias {alias!r} is also a stored tensor")
        if target not in keys:
            raise FormatError(f"{where}: alias {alias!r} points to {target!r}, which the file does not hold")
    return dict(aliases)


def check_finite(layer: PackedLayer, parts: Mapping[str, torch.Tensor], where: str) -> None:
    """LUT levels (or min and step) must be finite numbers."""
    for part, value in parts.items():
        if part not in ("indices", "packed") and not bool(torch.isfinite(value).all()):
            raise FormatError(f"{where}: layer {layer.name!r}: {part} holds NaN or infinite values")


def check_state_keys(
    expected: Mapping[str, tuple[int, ...]], stored: Mapping[str, tuple[int, ...]], where: str
) -> None:
    """The non-LUT tensors of the file are exactly the ones the model expects, with its shapes."""
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise FormatError(f"{where} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, shape in stored.items():
        if tuple(expected[key]) != tuple(shape):
            raise FormatError(
                f"{where}: tensor {key!r} has shape {list(shape)}, the model expects {list(expected[key])}"
            )


def stored_key(layer: PackedLayer, part: str, infix: str) -> str:
    """Key of a layer's part: ``<first module>.<part>`` in single files (infix ""),
    ``<module>.lut.<part>`` in folders."""
    return f"{layer.modules[0]}.{infix}{part}"


def check_layout(
    model: nn.Module,
    layers: Mapping[str, PackedLayer],
    table: Mapping[str, tuple[str, tuple[int, ...]]],
    where: str,
    infix: str = "",
    aliases: Mapping[str, str] | None = None,
) -> None:
    """Check a file's tensor ``table`` (key -> (dtype, shape)) against ``model`` (may live on the meta device).

    Every listed module exists, is a layer edkm clusters (:func:`edkm.layers.base.layer_kind`: Linear, Conv1D, Embedding
    or a subclass without children; or a LUT layer) whose weight, output channels first, has the layer's shape; every
    layer's parts are stored with their exact dtype and shape; the other tensors (plus ``aliases``)
    are exactly the model's remaining state-dict entries. Tied weights the model re-ties on load
    (Hugging Face ``all_tied_weights_keys``) may be absent.
    """
    weight_keys: set[str] = set()
    lut_keys: set[str] = set()
    for layer in layers.values():
        for name in layer.modules:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise FormatError(f"{where}: the model has no module {name!r} to load a LUT into") from None
            if isinstance(module, LUTModule):
                shape = module.lut.shape
            elif layer_kind(module) is not None:  # Linear (Conv1D: weight stored (in, out)), Embedding, subclasses
                shape = rows_first_weight(module).shape
            else:
                raise FormatError(
                    f"{where}: module {name!r} is a {type(module).__name__}, not a Linear, Conv1D or Embedding"
                )
            if tuple(shape) != layer.shape:
                raise FormatError(
                    f"{where}: module {name!r} has weight shape {list(shape)}, the file {list(layer.shape)}"
                )
            weight_keys.add(f"{name}.weight")
        for part, (dtype, shape) in layer.tensor_specs().items():
            key = stored_key(layer, part, infix)
            check_tensor(key, table, dtype, shape, where)
            lut_keys.add(key)
    state = model.state_dict(keep_vars=True)
    expected = {k: tuple(v.shape) for k, v in state.items() if k not in weight_keys and ".lut." not in f".{k}"}
    stored = {k: shape for k, (_, shape) in table.items() if k not in lut_keys}
    stored.update({alias: stored[target] for alias, target in (aliases or {}).items() if target in stored})
    for tied in getattr(model, "all_tied_weights_keys", None) or {}:
        if tied in expected and tied not in stored:
            stored[tied] = expected[tied]
    check_state_keys(expected, stored, where)


def check_buffer_budget(model: nn.Module, file_bytes: int, where: str) -> None:
    """Refuse a (meta) model whose buffers built from the config alone (not stored, e.g. masks or rotary
    tables) would take far more memory than the checkpoint itself: a crafted config must not allocate terabytes."""
    stored = model.state_dict().keys()
    extra = sum(b.numel() * b.element_size() for name, b in model.named_buffers() if name not in stored)
    if extra > 2 * file_bytes + (64 << 20):
        raise FormatError(
            f"{where}: the model config asks for {extra} bytes of buffers, far more than the checkpoint holds"
        )
