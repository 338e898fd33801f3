"""The packed on-disk format: one safetensors file, written atomically.

Tensors: ``<layer>.lut`` (fp16, (G, 2^b)) and ``<layer>.indices`` (uint8, b-bit values packed
densely, see :mod:`edkm.export.pack`) for every clustered weight, plus every other tensor of the
model's state dict as it is. Evenly spaced levels (round-to-nearest) are stored as ``<layer>.lo``
and ``<layer>.step`` (fp32, (G, 1)) instead of the LUT. The safetensors metadata holds one JSON
header under ``"edkm"``::

    {"format": "edkm-palettized", "version": 2,
     "layers": {name: {"bits", "shape", "groups", "dtype", "levels": "lut" | "uniform",
                       "modules": [tied module names]}},
     "aliases": {state-dict key: key it shares storage with},
     "model_config": Hugging Face config dict or null, "palettize_config": ... or null,
     "sha256": digest of every tensor's bytes in key order}

Example:
    >>> import torch, edkm, tempfile, os
    >>> model = edkm.rtn_(torch.nn.Sequential(torch.nn.Linear(16, 8)), edkm.PalettizeConfig(bits=3, memory="plain"))
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> edkm.save_palettized(model, path)
    >>> loaded = edkm.load_palettized(path, torch.nn.Sequential(torch.nn.Linear(16, 8)))
    >>> x = torch.randn(2, 16); torch.equal(loaded(x), model(x))
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..lut import LUTModule, LUTWeight
from ..wrap import set_submodule
from .pack import pack_bits, unpack_bits

FORMAT = "edkm-palettized"
VERSION = 2  # 2: uniform levels stored as lo + step (version-1 files hold LUTs only)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _lut_layers(model: nn.Module) -> dict[str, tuple[LUTWeight, list[str]]]:
    layers: dict[int, tuple[str, LUTWeight, list[str]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, LUTModule):
            layers.setdefault(id(module.lut), (name, module.lut, []))[2].append(name)
    return {name: (lut, names) for name, lut, names in layers.values()}


def _hf_config(model: nn.Module) -> dict[str, Any] | None:
    config = getattr(model, "config", None)
    return config.to_dict() if hasattr(config, "to_dict") else None


def save_palettized(model: nn.Module, path: str | os.PathLike) -> None:
    """Write a finalized model (see :func:`edkm.finalize_`) to ``path`` atomically."""
    from safetensors.torch import save_file

    layers = _lut_layers(model)
    if not layers:
        raise ValueError("the model has no LUT layers: call edkm.finalize_ (or ptq_kmeans_/rtn_) before saving")
    tensors: dict[str, torch.Tensor] = {}
    header: dict[str, Any] = {"format": FORMAT, "version": VERSION, "layers": {}, "aliases": {}}
    for name, (lut, names) in layers.items():
        levels = {"lo": lut.lo, "step": lut.step} if lut.uniform else {"lut": lut.lut}
        for part, value in levels.items():
            tensors[f"{name}.{part}"] = value.detach().cpu().contiguous()
        tensors[f"{name}.indices"] = pack_bits(lut.indices.cpu(), lut.bits)
        header["layers"][name] = {
            "bits": lut.bits, "shape": list(lut.shape), "groups": lut.lut.shape[0],
            "dtype": str(lut.dtype).removeprefix("torch."), "levels": "uniform" if lut.uniform else "lut",
            "modules": names,
        }
    lut_keys = tuple(f"{n}.lut." for _, names in layers.values() for n in names)
    seen: dict[tuple[int, tuple[int, ...], torch.dtype], str] = {}
    for key, value in model.state_dict().items():
        if key.startswith(lut_keys):
            continue
        ident = (value.untyped_storage().data_ptr() + value.storage_offset() * value.element_size(), tuple(value.shape), value.dtype)
        if ident in seen and value.numel():
            header["aliases"][key] = seen[ident]
        else:
            seen[ident] = key
            tensors[key] = value.detach().cpu().contiguous()
    config = getattr(model, "edkm_config", None)
    header["model_config"] = _hf_config(model)
    header["palettize_config"] = config.to_dict() if config is not None else None
    header["sha256"] = _digest(tensors)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"edkm": json.dumps(header)})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a packed file, validated; clear errors for anything else."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no packed edkm model at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{path} is not a readable safetensors file (corrupted or truncated?): {err}") from err
    if "edkm" not in metadata:
        raise ValueError(f"{path} is a safetensors file but not an edkm packed model (no 'edkm' header)")
    header = json.loads(metadata["edkm"])
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {header.get('format')!r}, expected {FORMAT!r}")
    if int(header.get("version", 0)) > VERSION:
        raise ValueError(f"{path} has format version {header['version']}, newer than this edkm reads ({VERSION}); upgrade edkm")
    return header


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no fp32 weights); buffers stay real."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _build_model(header: dict[str, Any]) -> nn.Module:
    if header.get("model_config") is None:
        raise ValueError("this file has no Hugging Face model config: pass the model to load into (model=...)")
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(header["model_config"])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with parameters_on_meta():  # the file fills every parameter: no random-init fp32 model on the way
        return AutoModelForCausalLM.from_config(config)


def load_palettized(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a packed model. Without ``model``, rebuild the Hugging Face model from the saved config."""
    from safetensors.torch import load_file

    header = read_header(path)
    try:
        tensors = load_file(path)
    except Exception as err:
        raise ValueError(f"{path}: cannot read tensors (corrupted or truncated?): {err}") from err
    if _digest(tensors) != header["sha256"]:
        raise ValueError(f"{path}: checksum mismatch, the file is corrupted")
    built = model is None  # built on meta parameters: the file's tensors become the parameters
    model = _build_model(header) if built else model
    for name, layer in header["layers"].items():
        shape, bits, groups = torch.Size(layer["shape"]), layer["bits"], layer["groups"]
        indices = unpack_bits(tensors.pop(f"{name}.indices"), bits, shape.numel()).reshape(groups, -1)
        dtype = getattr(torch, layer["dtype"])
        if layer.get("levels", "lut") == "uniform":
            lut = LUTWeight.from_uniform(tensors.pop(f"{name}.lo"), tensors.pop(f"{name}.step"), indices, shape, bits, dtype)
        else:
            lut = LUTWeight(tensors.pop(f"{name}.lut"), indices, shape, bits, dtype)
        for module_name in layer["modules"]:
            try:
                base = model.get_submodule(module_name)
            except AttributeError as err:
                raise ValueError(f"{path}: the model has no module {module_name!r} to load a LUT into") from err
            base = base if isinstance(base, LUTModule) else LUTModule(base, lut)
            base.lut = lut
            set_submodule(model, module_name, base)
    for alias, key in header["aliases"].items():
        tensors[alias] = tensors[key]
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=built)
    missing = [k for k in missing if ".lut." not in k]
    missing += [n for n, p in model.named_parameters() if p.device.type == "meta" and n not in missing]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model
