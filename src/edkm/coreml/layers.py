"""The conversion copy of a finalized model: dense weights that carry our LUTs as coremltools metadata.

coremltools reads compression metadata from a module's buffers (``_COREML_/weight/compression_type`` =
[2], palettization, and ``_COREML_/weight/lut`` of shape [groups, 1, 2^b, 1], one rank more than the
weight plus the vector axis) and ``_COREML_/metadata_version`` on the root; it then writes a
``constexpr_lut_to_dense`` op with our LUT and recomputes the indices as the nearest LUT entry, which
are ours because every weight already sits on its LUT. Nothing is re-clustered.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from edkm.layers.base import WrappedLayer, set_submodule
from edkm.layers.lut import LUTModule

TARGETS = ("ios18", "ios16")
IOS16_LUT_SIZES = (2, 4, 16, 64, 256)  # entries an iOS 16/17 constexpr_lut_to_dense takes
PALETTIZATION = 2  # coremltools' CompressionType.palettization
LUT_BUFFER, TYPE_BUFFER, VERSION_BUFFER = (
    "_COREML_/weight/lut",
    "_COREML_/weight/compression_type",
    "_COREML_/metadata_version",
)


def ios16_lut_size(bits: int) -> int:
    """Entries of the iOS 16 LUT a ``bits``-bit LUT is padded to.

    >>> [ios16_lut_size(b) for b in range(1, 9)]
    [2, 4, 16, 16, 64, 64, 256, 256]
    """
    return next(size for size in IOS16_LUT_SIZES if size >= 1 << bits)


def coreml_lut(module: LUTModule, target: str) -> torch.Tensor:
    """Our fp16 LUT in coremltools' layout: [groups, 1, k, 1] (Conv1D: [1, groups, k, 1], its output axis is 1).

    For iOS 16 the k entries are padded to a supported size with copies of the last entry (no new values).
    """
    lut = module.lut.lut.float()
    if target == "ios16":
        if lut.shape[0] > 1:
            raise ValueError(
                f"--target ios16 takes one LUT per tensor, this model has {lut.shape[0]} per tensor "
                "(group_size set): use --target ios18"
            )
        lut = torch.cat([lut, lut[:, -1:].expand(-1, ios16_lut_size(module.lut.bits) - lut.shape[1])], dim=1)
    lut = lut[:, None, :, None]
    return lut.transpose(0, 1).contiguous() if module.transposed else lut


class CoreMLLayer(WrappedLayer):
    """A LUT layer made dense for tracing (the decoded weight as a Parameter) with its LUT as coremltools metadata."""

    def __init__(self, base: LUTModule, weight: nn.Parameter, lut: torch.Tensor) -> None:
        super().__init__(base)
        self.weight = weight
        self.register_buffer(TYPE_BUFFER, torch.tensor([PALETTIZATION]))
        self.register_buffer(LUT_BUFFER, lut)

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return self._compute(x, self.rows_first(self.weight), *args, **kwargs)


@torch.no_grad()
def conversion_copy(model: nn.Module, target: str = "ios18") -> nn.Module:
    """A copy of a finalized ``model`` whose LUT layers are :class:`CoreMLLayer` (tied layers share one weight)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    model = copy.deepcopy(model).eval()
    layers = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, LUTModule)]
    if not layers:
        raise ValueError(
            "the model has no LUT layers: export a finalized edkm model (edkm.finalize_ / load_palettized)"
        )
    weights: dict[int, nn.Parameter] = {}
    for name, module in layers:
        if id(module.lut) not in weights:
            weights[id(module.lut)] = nn.Parameter(module.weight.float(), requires_grad=False)
        set_submodule(model, name, CoreMLLayer(module, weights[id(module.lut)], coreml_lut(module, target)))
    return model


def mark_compressed(root: nn.Module) -> nn.Module:
    """Register coremltools' metadata version on the module that gets traced."""
    root.register_buffer(VERSION_BUFFER, torch.tensor(1))
    return root
