"""`PalettizeConfig`: what to cluster and how finely (the memory mode is an option of ``palettize_``:
it changes no value).

``tau`` is relative to each tensor's own scale so that one value works for every layer and bit
width: the absolute temperature of a LUT is ``tau * s`` where ``s`` is the median squared gap
between neighbouring sorted centroids of the initial k-means (computed once per LUT). With
``tau = 1`` two neighbouring centroids at the typical gap share a weight half-way between them
with attention weights e^{-1/4} : e^{-1/4}; a weight on one centroid gives the neighbour
e^{-1} relative weight. Small tau -> nearly hard assignment; large tau -> centroids blur together.

Example:
    >>> from edkm import PalettizeConfig
    >>> cfg = PalettizeConfig(bits=3, overrides={"embed_tokens|lm_head": {"bits": 8}})
    >>> cfg.for_module("model.layers.0.mlp.up_proj").bits, cfg.for_module("lm_head").bits
    (3, 8)
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 2  # 2: tau_end joined the layer fields, memory left them (an option of palettize_)
EMBEDDING_LAYERS = r"embed|wte|wpe|lm_head"  # token/position embeddings and output heads of common HF causal LMs


@dataclass(frozen=True)
class LayerSpec:
    """Resolved clustering settings of one weight tensor."""

    bits: int = 3
    group_size: int | None = None  # output channels (rows) per LUT; None = one LUT per tensor
    tau: float = 0.05  # relative temperature (see module docstring) at the start of training
    tau_end: float | None = None  # relative temperature at the end (annealed geometrically); None = constant tau
    iters: int = 3  # centroid updates per forward
    eps: float = 0.0  # early stop on max|delta c| < eps (0 = always run `iters`)
    hard_forward: bool = False  # train on the hard-clustered weights, DKM gradients straight through

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be an integer from 1 to 8, got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            raise ValueError(f"group_size must be a positive integer or None, got {self.group_size!r}")
        if not self.tau > 0:
            raise ValueError(f"tau must be > 0, got {self.tau!r}")
        if self.tau_end is not None and not self.tau_end > 0:
            raise ValueError(f"tau_end must be > 0 or None, got {self.tau_end!r}")
        if not isinstance(self.iters, int) or self.iters < 0:
            raise ValueError(f"iters must be an integer >= 0, got {self.iters!r}")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps!r}")

    @property
    def k(self) -> int:
        return 1 << self.bits


@dataclass(frozen=True)
class PalettizeConfig(LayerSpec):
    """Train-time clustering plan for a model.

    Args:
        bits, group_size, tau, tau_end, iters, eps, hard_forward: defaults for every clustered tensor
            (see LayerSpec). ``hard_forward`` makes the training forward use the hard assignment that
            ships (W_soft + (W_hard - W_soft).detach()), so the loss optimised is the exported model's.
        modules: module types to cluster ("Linear", "Embedding").
        include: names or regexes (``re.search`` on the full module name); None = every module of
            those types. Each entry must match at least one module.
        exclude: names or regexes to leave alone (each must match at least one module).
        overrides: regex -> dict of LayerSpec fields, applied in order (later wins).
        cluster_dtype: 16-bit type the fp32 master weights are rounded to for clustering.
    """

    modules: tuple[str, ...] = ("Linear", "Embedding")
    include: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    cluster_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "modules", tuple(self.modules))  # frozen: set once, here
        unknown = set(self.modules) - {"Linear", "Embedding"}
        if unknown:
            raise ValueError(f"modules may be 'Linear' and/or 'Embedding', got {sorted(unknown)}")
        if self.cluster_dtype not in ("bfloat16", "float16"):
            raise ValueError(f"cluster_dtype must be 'bfloat16' or 'float16', got {self.cluster_dtype!r}")
        for pattern, values in self.overrides.items():
            bad = set(values) - set(LAYER_FIELDS)
            if bad:
                raise ValueError(f"override {pattern!r} sets unknown fields {sorted(bad)}; valid: {LAYER_FIELDS}")
            self.for_module(pattern)  # validates values

    def _defaults(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in LAYER_FIELDS}

    def for_module(self, name: str) -> LayerSpec:
        """The LayerSpec of module ``name`` after overrides."""
        values = self._defaults()
        for pattern, override in self.overrides.items():
            if matches(pattern, name):
                values.update(override)
        return LayerSpec(**values)

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PalettizeConfig:
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(f"config format version {version} is newer than this edkm supports ({FORMAT_VERSION})")
        if version < 2:  # version 1 kept the memory mode (which changes no value) among the layer fields
            data.pop("memory", None)
            data["overrides"] = {
                k: {f: v for f, v in o.items() if f != "memory"} for k, o in data.get("overrides", {}).items()
            }
        return cls(**data)


LAYER_FIELDS = tuple(f.name for f in dataclasses.fields(LayerSpec))  # what an override may set


def matches(pattern: str, name: str) -> bool:
    """True when ``pattern`` is ``name`` or a regex found in it."""
    return name == pattern or re.search(pattern, name) is not None
