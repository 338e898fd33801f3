"""The projections of a lean forward: one callable per (fused) Linear, calling the native kernel directly.

A :class:`Projection` multiplies ``x (T, cols)`` by the rows of one or more Linear layers of the same input
(q/k/v, gate/up): packed LUT layers are fused into one native weight (their bit-packed rows concatenated, each
LUT repeated over its rows), so a decode step makes one kernel call where transformers makes three. Layers that
cannot be fused (dense ones, different bits or LUT layouts, no native kernel) are multiplied one by one and
concatenated. Every weight is the layer's own (``edkm.decode``'s values); only the fp32 summation order may
differ from decode-then-matmul.

Example:
    >>> import torch, edkm
    >>> layers = edkm.rtn_(torch.nn.ModuleList([torch.nn.Linear(64, 32), torch.nn.Linear(64, 16)]),
    ...                    edkm.PalettizeConfig(bits=3))
    >>> proj = Projection.of(list(layers))
    >>> x = torch.randn(2, 64)
    >>> ref = torch.cat([layers[0](x), layers[1](x)], -1)
    >>> proj.rows, bool(torch.allclose(proj(x), ref, atol=1e-6))
    (48, True)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from edkm.kernels import native
from edkm.layers.lut import LUTModule


class Part(NamedTuple):
    """One weight of a projection: ``packed`` for the native kernel (with ``bias``), else the ``module`` itself."""

    packed: native.PackedWeight | None
    module: nn.Module | None
    bias: torch.Tensor | None
    rows: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x) if self.packed is None else native.linear(x, self.packed, self.bias)


def is_native(module: nn.Module) -> bool:
    """Whether ``module`` is a CPU fp32 LUT Linear computing with the native kernel (``auto`` / ``native``)."""
    if not isinstance(module, LUTModule) or module.base_type != "Linear" or module.transposed or module.shell:
        return False
    lut = module.lut
    return (
        lut.kernel in ("auto", "native")
        and lut.dtype == torch.float32
        and lut.lut.device.type == "cpu"  # not `indices`: a compact weight would unpack them to answer
        and native.available()
    )


def part_of(module: nn.Module, shared: bool = True) -> Part:
    """A :class:`Part` for a Linear: packed where the native kernel takes it, else the module computes.

    ``shared``: the packed weight is the one the layer caches for its own forward (no second copy); else a new one.
    """
    packed = None
    if is_native(module):
        lut = module.lut
        try:
            packed = (
                lut.kernel_views().packed
                if shared
                else native.PackedWeight.from_lut(lut.lut, lut.indices, lut.shape, lut.dtype)
            )
        except ValueError:  # groups straddle rows: no native layout
            packed = None
    if packed is None:
        rows = module.lut.shape[0] if isinstance(module, LUTModule) else module.weight.shape[0]
        return Part(None, module, None, rows)
    bias = None if module.bias is None else module.bias.detach().float()
    return Part(packed, None, bias, packed.rows)


def fuse(parts: list[Part]) -> Part | None:
    """The parts' rows as one packed weight, or None if they differ in bits, columns or column groups.

    Row groups become the greatest common divisor of the parts' group heights (each LUT repeated to it).
    """
    ws = [p.packed for p in parts]
    if any(w is None for w in ws) or len({(w.bits, w.cols, w.C) for w in ws}) != 1:
        return None
    R = math.gcd(*(w.R for w in ws), *(w.rows for w in ws))
    tables = [w.table.repeat_interleave(w.R // R, dim=0) for w in ws]
    biases = [p.bias if p.bias is not None else torch.zeros(p.rows) for p in parts]
    any_bias = any(p.bias is not None for p in parts)
    w0 = ws[0]
    fused = native.PackedWeight(
        torch.cat([w.packed for w in ws]),
        torch.cat(tables).contiguous(),
        w0.bits,
        sum(w.rows for w in ws),
        w0.cols,
        R,
        w0.C,
        w0.dtype,
    )
    return Part(fused, None, torch.cat(biases) if any_bias else None, fused.rows)


def share_rows(modules: list[nn.Module], fused: torch.Tensor) -> None:
    """Make each compact layer's packed rows a view of its rows in ``fused`` (equal bytes: one copy resident)."""
    start = 0
    for m in modules:
        rows = m.lut.shape[0]
        view = fused[start : start + rows]
        if not torch.equal(view, m.lut.packed):
            raise AssertionError("fused rows differ from the layer's")  # a bug, not bad input
        m.lut._buffers["packed"] = view
        m.lut.views = None  # its kernel views held the old rows
        start += rows


class Projection(NamedTuple):
    """``x (T, cols) -> (T, sum of rows)`` for Linear layers of one input: fused where possible."""

    parts: tuple[Part, ...]

    @classmethod
    def of(cls, modules: list[nn.Module]) -> Projection:
        """One fused part for several native LUT layers of equal bits and column groups, else one part per layer.

        Layers whose LUTWeight is compact (bit-packed only, as loaded for inference) are re-pointed at their rows
        of the fused buffer (the same bytes), so fusing costs no second copy; others keep their own indices.
        """
        if len(modules) > 1 and all(is_native(m) for m in modules):
            compact = all(m.lut.compact for m in modules)
            fused = fuse([part_of(m, shared=compact) for m in modules])
            if fused is not None:
                if compact:
                    share_rows(modules, fused.packed.packed)
                return cls((fused,))
        return cls(tuple(part_of(m) for m in modules))

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    @property
    def fused(self) -> bool:
        """Whether one packed kernel call computes every row."""
        return len(self.parts) == 1 and self.parts[0].packed is not None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.parts) == 1:
            return self.parts[0](x)
        return torch.cat([p(x) for p in self.parts], dim=-1)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors this projection holds (for counting resident bytes)."""
        out = []
        for p in self.parts:
            if p.packed is not None:
                out += [p.packed.packed, p.packed.table, *([] if p.bias is None else [p.bias])]
        return out
