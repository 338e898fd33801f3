"""Loading a packed model: an edkm Hugging Face folder, or a packed file into a given model or a new HF model.

Example:
    >>> import torch, edkm, tempfile, os
    >>> model = edkm.rtn_(torch.nn.Sequential(torch.nn.Linear(16, 8)), edkm.PalettizeConfig(bits=3))
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> edkm.save_palettized(model, path)
    >>> loaded = load_palettized(path, torch.nn.Sequential(torch.nn.Linear(16, 8)))
    >>> x = torch.randn(2, 16); torch.equal(loaded(x), model(x))
    True
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from edkm.export.errors import FormatError
from edkm.export.format import PackedFile, load_into, read_packed
from edkm.export.stream import read_streamed
from edkm.export.validate import check_buffer_budget, check_layout
from edkm.hf import register
from edkm.hf.folder import load_folder
from edkm.kernels import native
from edkm.models.quiet import quiet_loading


def load_palettized(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a packed file or an edkm Hugging Face folder.

    Without ``model``, build the Hugging Face model of the saved config (on the meta device, through
    transformers and the edkm quantizer). Damaged or crafted input raises FormatError.
    """
    if Path(path).is_dir():
        return load_folder(path)
    if model is not None:
        return load_into(path, model)
    rows = "native" if native.available() else "stored"  # native: the kernel's rows built as the file is read
    packed, tensors = read_streamed(path) if rows == "native" else read_packed(path)
    if packed.header.get("model_config") is None:
        raise FormatError(f"{path} has no Hugging Face model config: pass the model to load into (model=...)")
    return _load_hf(packed, tensors, rows)


def _load_hf(packed: PackedFile, tensors: dict[str, torch.Tensor], rows: str = "stored") -> nn.Module:
    """Build the Hugging Face model of the saved config with transformers, through the edkm quantizer
    (``rows``: how ``tensors`` holds the indices, see :data:`edkm.hf.config.ROWS`)."""
    # deferred: transformers (and the modules built on it) load only when a Hugging Face model is built
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from edkm.hf.config import EdkmConfig
    from edkm.hf.quantizer import INFIX, slot_specs

    register()
    where = str(packed.path)
    cfg = dict(packed.header["model_config"])
    try:
        config = AutoConfig.for_model(cfg.pop("model_type", None), **cfg)
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except Exception as err:
        raise FormatError(f"{where}: the saved model config is not a causal LM transformers can build: {err}") from err
    if getattr(config, "num_hidden_layers", 0) > len(packed.table):  # each layer stores tensors: refuse a crafted size
        raise FormatError(
            f"{where}: the model config asks for {config.num_hidden_layers} layers, "
            f"the file holds {len(packed.table)} tensors"
        )
    try:
        with torch.device("meta"):
            skeleton = model_class(config)
    except Exception as err:
        raise FormatError(
            f"{where}: transformers cannot build the saved model config: {type(err).__name__}: {err}"
        ) from err
    check_layout(skeleton, packed.layers, packed.table, where, "", packed.aliases)
    check_buffer_budget(skeleton, packed.path.stat().st_size, where)
    parts = {name: slot_specs(layer, rows) for name, layer in packed.layers.items()}
    lut_keys = {f"{name}.{part}" for name, specs in parts.items() for part in specs}
    state = {k: v for k, v in tensors.items() if k not in lut_keys}
    state.update({alias: state[target] for alias, target in packed.aliases.items()})
    for name, specs in parts.items():
        state.update({f"{name}.{INFIX}{part}": tensors.pop(f"{name}.{part}") for part in specs})
    palettize = packed.header.get("palettize_config") or {}
    config.quantization_config = EdkmConfig(
        layers={name: layer.to_json() for name, layer in packed.layers.items()},
        bits=palettize.get("bits"),
        group_size=palettize.get("group_size"),
        palettize_config=packed.header.get("palettize_config"),
    ).to_dict() | {"rows": rows}
    with quiet_loading():
        return model_class.from_pretrained(None, config=config, state_dict=state)
