"""Model size before and after palettization, computed on the meta device (no weights needed).

Example (LLaMA-7B, 3-bit decoder linears, 8-bit embedding and output layer)::

    $ edkm size llama-7b --bits 3 --override 'embed_tokens|lm_head=8'
    parameters: 6.738 B, clustered: 6.738 B
    fp16: 12.55 GiB -> palettized: 2.51 GiB (5.0x smaller)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edkm.config import PalettizeConfig
from edkm.export.pack import packed_nbytes
from edkm.jobs.presets import PRESETS
from edkm.layers.base import rows_first_weight
from edkm.models.gguf import check_gguf, resolve_gguf
from edkm.transform import weight_plans

GiB = 1 << 30


def load_config(spec: str) -> Any:
    """A transformers config from a preset name, a config.json path, or a checkpoint folder."""
    # deferred: transformers is the hf extra, loaded only when a model config is read
    from transformers import AutoConfig

    if spec in PRESETS:
        fields = dict(PRESETS[spec])
        return AutoConfig.for_model(fields.pop("model_type"), **fields, tie_word_embeddings=False)
    gguf = resolve_gguf(spec)
    if gguf is not None:  # the config transformers reads from the file's header
        check_gguf(gguf)
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json / model folder")
    data = json.loads(path.read_text())
    if "model_type" not in data:
        raise ValueError(f"{path} has no 'model_type': not a Hugging Face config")
    return AutoConfig.for_model(data.pop("model_type"), **data)


def meta_model(config: Any) -> nn.Module:
    """The causal LM of ``config`` with meta tensors (shapes only)."""
    # deferred: transformers is the hf extra, loaded only when a Hugging Face model is built
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def palettized_size(model: nn.Module, config: PalettizeConfig) -> dict[str, int]:
    """Bytes at fp16 and after palettization (b-bit indices + fp16 LUTs + fp16 other tensors).

    Tied parameters count once.
    """
    params = {id(p): p for p in model.parameters()}
    clustered: dict[int, int] = {}
    for modules, spec in weight_plans(model, config):
        w = rows_first_weight(modules[0][1])
        if spec.group_size is not None and w.shape[0] % spec.group_size:
            raise ValueError(
                f"group_size {spec.group_size} does not divide the {w.shape[0]} output channels of "
                f"{modules[0][0]} {tuple(w.shape)}"
            )
        groups = 1 if spec.group_size is None else w.shape[0] // spec.group_size
        clustered[id(modules[0][1].weight)] = packed_nbytes(w.numel(), spec.bits) + groups * spec.k * 2
    fp16 = sum(p.numel() * 2 for p in params.values())
    other = sum(p.numel() * 2 for key, p in params.items() if key not in clustered)
    return {
        "params": sum(p.numel() for p in params.values()),
        "clustered_params": sum(params[key].numel() for key in clustered),
        "fp16_bytes": fp16,
        "palettized_bytes": sum(clustered.values()) + other,
    }
