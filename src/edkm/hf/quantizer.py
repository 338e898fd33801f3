"""The ``edkm`` Hugging Face quantizer: loads and saves palettized models with ``from_pretrained`` /
``save_pretrained``.

Loading: transformers builds the model on the meta device; before any weight is read, the
quantizer checks the ``quantization_config`` and the checkpoint's tensor table against the model
(every key, dtype and shape; the checksum over config and tensors), then puts a
:class:`PackedSlot` where every clustered Linear/Embedding was. transformers loads the stored
LUTs and packed indices into the slots; afterwards each slot becomes a
:class:`~edkm.layers.lut.LUTModule` (tied modules share one LUT). No fp32 weight is ever materialised.
On CPU with the native kernel every LUT keeps its indices bit-packed (``LUTWeight.compact_``: ~b/8 bytes
per weight resident instead of 1). Llama-architecture models get the lean ``generate`` of
:func:`edkm.generation.bind` (the way transformers binds a repository's ``custom_generate``); any call it cannot
answer exactly runs transformers' own.

Saving: ``get_state_dict_and_metadata`` stores every LUT layer once as ``<module>.lut.lut`` (or
``lo`` + ``step``) and ``<module>.lut.indices`` (b-bit values packed densely), with the checksum
in the safetensors metadata (``edkm_sha256``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer

from edkm.export.errors import FormatError
from edkm.export.layers import build_lut, digest, digest_items, lut_layers, packed_parts
from edkm.export.stream import native_shape
from edkm.export.validate import PackedLayer, check_buffer_budget, check_finite, check_layout
from edkm.generation import bind
from edkm.hf.config import QUANT_METHOD, EdkmConfig
from edkm.layers.base import WrappedLayer, set_submodule
from edkm.layers.lut import LUTModule

CHECKSUM_KEY = "edkm_sha256"
INFIX = "lut."  # a layer's parts are stored as <module>.lut.<part>: the LUTModule's own state-dict keys
_TORCH_DTYPES = {"F16": torch.float16, "F32": torch.float32, "U8": torch.uint8}


class PackedSlot(WrappedLayer):
    """Stand-in for a clustered module while weights load: the stored parts as (meta) buffers of child ``lut``.

    Only the first module of a tied group owns the parts; the others hold none. ``base`` (the model's own
    module, on the meta device, not a submodule) stays at hand to compute the buffers a checkpoint does not
    store (Gemma's ``embed_scale``), see :meth:`init_unstored_buffers`.
    """

    def __init__(self, base: nn.Module, layer: PackedLayer, owner: bool, rows: str = "stored") -> None:
        super().__init__(base)
        self.__dict__.pop("weight", None)
        self._parameters.pop("weight", None)
        self.__dict__["_base"] = base  # not a submodule; the leading underscore keeps WrappedLayer from copying it
        self.decode_dtype = base.weight.dtype  # the dtype the model is being loaded in: its LUTs decode to it
        if owner:
            self.lut = nn.Module()
            for part, (dtype, shape) in slot_specs(layer, rows).items():
                self.lut.register_buffer(part, torch.empty(shape, dtype=_TORCH_DTYPES[dtype], device="meta"))

    @property
    def weight(self) -> torch.Tensor:  # the original meta weight: model init code may touch it (GPT-2 rescales c_proj)
        if "_base" not in self.__dict__:
            raise AttributeError("weight")  # while WrappedLayer registers the base's parameters
        return self.__dict__["_base"].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("edkm: this layer was not loaded (from_pretrained did not finish)")

    @torch.no_grad()
    def init_unstored_buffers(self, model: nn.Module) -> None:
        """Fill the non-persistent buffers (materialised empty by transformers) with the values the model's own
        ``_init_weights`` gives the original module class (a slot is not of that class, so transformers skipped it)."""
        base = self.__dict__["_base"]
        names = [k for k, v in base._buffers.items() if v is not None and k in base._non_persistent_buffers_set]
        if not names:
            return
        for key in names:
            base._buffers[key] = self._buffers[key]  # the slot's real tensor: initialised in place
        model._init_weights(base)  # base's weight and bias stay on the meta device: only the buffers are written


def slot_specs(layer: PackedLayer, rows: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """part -> (dtype, shape) a slot receives: the stored parts, or (``rows="native"``) the kernel's rows
    ``packed`` instead of ``indices`` where :func:`~edkm.export.stream.native_shape` gives them."""
    specs = layer.tensor_specs()
    shape = native_shape(layer) if rows == "native" else None
    if shape is not None:
        del specs["indices"]
        specs["packed"] = ("U8", shape)
    return specs


def checkpoint_table(files: Sequence[str]) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str]]:
    """(key -> (dtype, shape)) over every checkpoint file, and the first file's metadata."""
    table: dict[str, tuple[str, tuple[int, ...]]] = {}
    metadata: dict[str, str] = {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                metadata = metadata or dict(f.metadata() or {})
                for key in f.keys():
                    piece = f.get_slice(key)
                    table[key] = (piece.get_dtype(), tuple(piece.get_shape()))
        except Exception as err:  # safetensors raises its own error types for damaged files
            raise FormatError(f"{path} is not a readable safetensors file (corrupted or truncated?): {err}") from err
    return table, metadata


def verify_checksum(files: Sequence[str], header: dict[str, Any], expected: str | None) -> None:
    """Recompute the checksum over ``header`` and every tensor of ``files``; FormatError when it differs."""
    if expected is None:
        raise FormatError(f"{files[0]}: no {CHECKSUM_KEY} in the safetensors metadata (not written by edkm?)")
    try:
        with ExitStack() as stack:
            handles = [stack.enter_context(safe_open(path, framework="pt")) for path in files]
            owner = {key: f for f in handles for key in f.keys()}
            found = digest_items(((key, owner[key].get_tensor(key)) for key in sorted(owner)), header)
    except Exception as err:
        raise FormatError(f"{files[0]}: cannot read tensors (corrupted or truncated?): {err}") from err
    if found != expected:
        raise FormatError(f"{files[0]}: checksum mismatch, the folder is corrupted (model.safetensors or config.json)")


UNCHECKED_CONFIG_KEYS = {
    "dtype",
    "torch_dtype",
    "architectures",
    "transformers_version",
    "_name_or_path",
    "name_or_path",
    "quantization_config",
    "_commit_hash",
    "_attn_implementation_autoset",
    "attn_implementation",
}


def checked_header(quantization_config: EdkmConfig, model_config: Any) -> dict[str, Any]:
    """What the folder checksum covers besides the tensors: the quantization config and the model config
    (less the fields transformers rewrites on every save or load)."""
    config = {k: v for k, v in model_config.to_dict().items() if k not in UNCHECKED_CONFIG_KEYS}
    return {**quantization_config.header(), "model_config": config}


class EdkmHfQuantizer(HfQuantizer):
    """Loads pre-palettized edkm checkpoints (there is no on-the-fly quantization: use ``edkm compress``)."""

    requires_calibration = True
    quantization_config: EdkmConfig

    def update_attn_implementation(self, config: Any) -> Any:
        """Seen before the model is built: refuse a config that would build far more layers than the checkpoint has."""
        layers = getattr(config.get_text_config(decoder=True), "num_hidden_layers", None)
        limit = 4 * len(self.quantization_config.layers) + 64
        if isinstance(layers, int) and layers > limit:
            raise FormatError(
                f"config.json: num_hidden_layers {layers} does not fit the "
                f"{len(self.quantization_config.layers)} clustered tensors"
            )
        return config

    def _process_model_before_weight_loading(
        self, model: nn.Module, checkpoint_files: Sequence[str] | None = None, **kwargs: Any
    ) -> None:
        layers = self.quantization_config.packed_layers()
        if checkpoint_files:  # from a folder; a state_dict passed in memory was checked by its reader
            table, metadata = checkpoint_table(checkpoint_files)
            check_layout(model, layers, table, str(checkpoint_files[0]), INFIX)
            check_buffer_budget(model, sum(os.path.getsize(f) for f in checkpoint_files), str(checkpoint_files[0]))
            header = checked_header(self.quantization_config, model.config)
            verify_checksum(checkpoint_files, header, metadata.get(CHECKSUM_KEY))
        for layer in layers.values():
            for i, name in enumerate(layer.modules):
                slot = PackedSlot(model.get_submodule(name), layer, owner=i == 0, rows=self.quantization_config.rows)
                set_submodule(model, name, slot)
        clustered = {f"{name}.weight" for layer in layers.values() for name in layer.modules}
        tied = getattr(model, "all_tied_weights_keys", None)
        if tied:  # the LUT layers share their LUT themselves; transformers must not tie their (absent) weights
            model.all_tied_weights_keys = {t: s for t, s in tied.items() if t not in clustered and s not in clustered}

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        for layer in self.quantization_config.packed_layers().values():
            owner = model.get_submodule(layer.modules[0])
            parts = dict(owner.lut.named_buffers())
            if any(value.device.type == "meta" for value in parts.values()):
                raise FormatError(f"layer {layer.name!r}: its tensors were not in the checkpoint")
            check_finite(layer, parts, f"layer {layer.name!r}")
            device = next(iter(parts.values())).device
            # on CPU with the native kernel: indices stay bit-packed (b/8 bytes per weight), no uint8 copy made
            cpu_parts = {k: v.cpu() for k, v in parts.items()}
            lut = build_lut(layer, cpu_parts, owner.decode_dtype, compact=device.type == "cpu").to(device)
            for name in layer.modules:
                slot = model.get_submodule(name)
                slot.init_unstored_buffers(model)
                set_submodule(model, name, LUTModule(slot, lut))
        return bind(model)  # model.generate through the lean decode path where it runs (edkm.generation)

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        # deferred: transformers.modeling_utils imports transformers.quantizers, whose loading imports this module
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        config = EdkmConfig.from_model(model)
        self.quantization_config = model.config.quantization_config = config
        layers = lut_layers(model)
        owned = tuple(f"{name}.lut." for _, names in layers.values() for name in names)
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(owned)}
        for name, (lut, _) in layers.items():
            state.update({f"{name}.{INFIX}{part}": value for part, value in packed_parts(lut).items()})
        state = remove_tied_weights_from_state_dict(state, model)
        return state, {CHECKSUM_KEY: digest(state, checked_header(config, model.config))}

    def is_serializable(self, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def attach(model: nn.Module) -> nn.Module:
    """Make a finalized Hugging Face model save as an edkm folder with ``model.save_pretrained(DIR)``."""
    config = EdkmConfig.from_model(model)
    model.config.quantization_config = config
    model.hf_quantizer = EdkmHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    return model


def register_with_transformers() -> None:
    """Add ``quant_method: "edkm"`` to transformers' registries (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantization_config(QUANT_METHOD)(EdkmConfig)
        register_quantizer(QUANT_METHOD)(EdkmHfQuantizer)


register_with_transformers()  # importing this module (which loads transformers' registry) registers edkm
