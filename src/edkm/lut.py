"""Hard-clustered layers: a LUT plus indices per weight, decoded on use.

``LUTWeight`` holds an fp16 LUT (G, 2^b) and uint8 indices (G, n); ``LUTModule`` is the
``nn.Linear`` / ``nn.Embedding`` that computes with it. ``WrappedLayer`` is the plumbing both the
DKM (training) and the LUT (inference) layers share.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cluster import decode

LUT_DTYPE = torch.float16


def uniform_levels(lo: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """fp16 LUT (G, 2^bits) of the evenly spaced levels ``lo + step * j`` (fp32 math, (G, 1) inputs)."""
    return (lo.float() + step.float() * torch.arange(1 << bits, dtype=torch.float32, device=lo.device)).to(LUT_DTYPE)


class LUTWeight(nn.Module):
    """Hard-clustered weight: fp16 LUT (G, k) and indices (G, n); decoded on use.

    A LUT of evenly spaced levels (round-to-nearest) also keeps ``lo`` and ``step`` (fp32, (G, 1)),
    which the export stores instead of the 2^b levels: a scale and a zero point per group.
    """

    def __init__(
        self, lut: torch.Tensor, indices: torch.Tensor, shape: torch.Size, bits: int, dtype: torch.dtype,
        uniform: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("lut", lut)
        self.register_buffer("indices", indices)
        self.shape, self.bits, self.dtype = torch.Size(shape), bits, dtype
        if uniform is not None:
            self.register_buffer("lo", uniform[0])
            self.register_buffer("step", uniform[1])

    @property
    def uniform(self) -> bool:
        """Whether the levels are evenly spaced (kept as ``lo`` and ``step``)."""
        return "lo" in self._buffers

    @classmethod
    def from_uniform(cls, lo: torch.Tensor, step: torch.Tensor, indices: torch.Tensor, shape: torch.Size, bits: int,
                     dtype: torch.dtype) -> "LUTWeight":
        """The LUT of ``uniform_levels(lo, step, bits)``; exactly what :func:`edkm.rtn_` computes with."""
        return cls(uniform_levels(lo, step, bits), indices, shape, bits, dtype, uniform=(lo, step))

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, bits={self.bits}, groups={self.lut.shape[0]}" + (", uniform" if self.uniform else "")

    def forward(self) -> torch.Tensor:
        return decode(self.lut, self.indices, self.shape, self.dtype)


class WrappedLayer(nn.Module):
    """Shared plumbing of DKM and LUT layers: keeps the wrapped module's attributes (weight, bias, padding_idx, ...)."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        for key, value in vars(base).items():
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        for key, param in base._parameters.items():
            self.register_parameter(key, param)  # the same Parameter objects (bias may be None)
        self.base_type: str = getattr(base, "base_type", type(base).__name__)

    def _compute(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.base_type == "Linear":
            return F.linear(x, weight, self.bias)
        return F.embedding(x, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)


class LUTModule(WrappedLayer):
    """nn.Linear / nn.Embedding computing with a decoded LUT weight (no weight Parameter)."""

    def __init__(self, base: nn.Module, lut: LUTWeight) -> None:
        super().__init__(base)
        self.__dict__.pop("weight", None)
        self._parameters.pop("weight", None)
        self.lut = lut

    @property
    def weight(self) -> torch.Tensor:  # decoded, for code that inspects `.weight`
        return self.lut()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._compute(x, self.lut())
