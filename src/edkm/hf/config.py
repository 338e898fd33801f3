"""``quantization_config`` of an edkm Hugging Face folder (``config.json``), validated when read.

Stored fields: ``quant_method: "edkm"``, ``format``/``version`` of this layout, ``bits`` and
``group_size`` of the plan (defaults; ``layers`` holds every tensor's own bits), ``layers``
(first module name -> bits, shape, groups, decode dtype, levels, tied module names) and the
``palettize_config`` the model was trained with.

Example:
    >>> from edkm.hf.config import EdkmConfig
    >>> cfg = EdkmConfig(layers={"fc": {"bits": 3, "shape": [4, 8], "groups": 1, "dtype": "float32",
    ...                                 "levels": "lut", "modules": ["fc"]}}, bits=3)
    >>> cfg.to_dict()["quant_method"], cfg.packed_layers()["fc"].bits
    ('edkm', 3)
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.utils.quantization_config import QuantizationConfigMixin

from edkm.export.errors import FormatError
from edkm.export.layers import describe, lut_layers
from edkm.export.validate import PackedLayer, check_int, parse_layers

QUANT_METHOD = "edkm"
FORMAT = "edkm-hf"
VERSION = 1
WHERE = "config.json quantization_config"
# "stored": every layer's densely packed indices, as in the file; "native": the native kernel's rows
# (``<module>.lut.packed``) for each layer of edkm.export.stream.native_shape (what edkm.load_palettized passes)
ROWS = ("stored", "native")
FIELDS = ("quant_method", "format", "version", "bits", "group_size", "layers", "palettize_config")


class EdkmConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a palettized model; raises FormatError on any bad field."""

    def __init__(
        self,
        layers: dict[str, Any] | None = None,
        format: str = FORMAT,
        version: int = VERSION,  # noqa: A002
        bits: int | None = None,
        group_size: int | None = None,
        palettize_config: dict[str, Any] | None = None,
        rows: str = "stored",
        **kwargs: Any,
    ) -> None:
        self.rows = rows  # how the state being loaded holds indices (a load option: not saved, not checksummed)
        self.quant_method = QUANT_METHOD
        self.format, self.version, self.bits, self.group_size = format, version, bits, group_size
        self.layers = layers or {}
        self.palettize_config = palettize_config
        self.post_init()

    def post_init(self) -> None:
        if self.format != FORMAT:
            raise FormatError(f"{WHERE}: unknown format {self.format!r}, expected {FORMAT!r}")
        version = check_int(self.version, "version", 1, 1 << 30, WHERE)
        if version > VERSION:
            raise FormatError(
                f"{WHERE}: format version {version} is newer than this edkm reads ({VERSION}); upgrade edkm"
            )
        if self.bits is not None:
            check_int(self.bits, "bits", 1, 8, WHERE)
        if self.group_size is not None:
            check_int(self.group_size, "group_size", 1, 1 << 40, WHERE)
        if self.rows not in ROWS:
            raise FormatError(f"{WHERE}: rows must be one of {ROWS}, got {self.rows!r}")
        if self.palettize_config is not None and not isinstance(self.palettize_config, dict):
            raise FormatError(f"{WHERE}: palettize_config must be an object or null")
        self.packed_layers()

    def packed_layers(self) -> dict[str, PackedLayer]:
        """The validated layers."""
        return parse_layers(self.layers, WHERE)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in FIELDS}

    def header(self) -> dict[str, Any]:
        """What the folder's checksum covers of this config (everything but ``quant_method``)."""
        return {name: getattr(self, name) for name in FIELDS if name != "quant_method"}

    @classmethod
    def from_model(cls, model: nn.Module) -> EdkmConfig:
        """The config describing a finalized model's LUT layers."""
        layers = lut_layers(model)
        if not layers:
            raise ValueError("the model has no LUT layers: call edkm.finalize_ (or ptq_kmeans_/rtn_) before saving")
        plan = getattr(model, "edkm_config", None)
        previous = getattr(getattr(model, "config", None), "quantization_config", None)
        palettize = plan.to_dict() if plan is not None else getattr(previous, "palettize_config", None)
        return cls(
            layers={name: describe(lut, names).to_json() for name, (lut, names) in layers.items()},
            bits=plan.bits if plan is not None else getattr(previous, "bits", None),
            group_size=plan.group_size if plan is not None else getattr(previous, "group_size", None),
            palettize_config=palettize,
        )
