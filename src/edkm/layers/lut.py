"""Hard-clustered layers: a LUT plus indices per weight, decoded on use.

``LUTWeight`` holds an fp16 LUT (G, 2^b) and uint8 indices (G, n); ``LUTModule`` is the ``nn.Linear`` /
``nn.Embedding`` / ``Conv1D`` (or subclass, with its own forward) that computes with it.

Example:
    >>> import torch
    >>> w = LUTWeight(torch.tensor([[0.5, -1.0]], dtype=torch.float16), torch.tensor([[0, 1, 1, 0]], dtype=torch.uint8),
    ...               torch.Size([2, 2]), 1, torch.float32)
    >>> w()
    tensor([[ 0.5000, -1.0000],
            [-1.0000,  0.5000]])
"""

from __future__ import annotations

import torch
from torch import nn

from edkm.cluster import decode
from edkm.kernels import Int8Weight, KernelViews, check_kernel, decode_rows, lut_embedding, lut_linear
from edkm.layers.base import WrappedLayer

LUT_DTYPE = torch.float16


def uniform_levels(lo: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """fp16 LUT (G, 2^bits) of the evenly spaced levels ``lo + step * j`` (fp32 math, (G, 1) inputs)."""
    return (lo.float() + step.float() * torch.arange(1 << bits, dtype=torch.float32, device=lo.device)).to(LUT_DTYPE)


class LUTWeight(nn.Module):
    """Hard-clustered weight: fp16 LUT (G, k) and indices (G, n); decoded on use.

    A LUT of evenly spaced levels (round-to-nearest) also keeps ``lo`` and ``step`` (fp32, (G, 1)),
    which the export stores instead of the 2^b levels: a scale and a zero point per group.

    :meth:`linear` and :meth:`embedding` compute without decoding the whole weight (``kernel``,
    see :mod:`edkm.kernels.linear`); calling the module decodes it all (for inspection).
    """

    def __init__(
        self,
        lut: torch.Tensor,
        indices: torch.Tensor,
        shape: torch.Size,
        bits: int,
        dtype: torch.dtype,
        uniform: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("lut", lut)
        self.register_buffer("indices", indices)
        self.shape, self.bits, self.dtype = torch.Size(shape), bits, dtype
        self.kernel = "auto"
        self.int8: Int8Weight | None = None  # the int8 re-grid, only while kernel == "int8"
        self.views: KernelViews | None = None  # the kernels' views of the current buffers (rebuilt if they change)
        if uniform is not None:
            self.register_buffer("lo", uniform[0])
            self.register_buffer("step", uniform[1])

    @property
    def uniform(self) -> bool:
        """Whether the levels are evenly spaced (kept as ``lo`` and ``step``)."""
        return "lo" in self._buffers

    @classmethod
    def from_uniform(
        cls,
        lo: torch.Tensor,
        step: torch.Tensor,
        indices: torch.Tensor,
        shape: torch.Size,
        bits: int,
        dtype: torch.dtype,
    ) -> LUTWeight:
        """The LUT of ``uniform_levels(lo, step, bits)``; exactly what :func:`edkm.rtn_` computes with."""
        return cls(uniform_levels(lo, step, bits), indices, shape, bits, dtype, uniform=(lo, step))

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, bits={self.bits}, groups={self.lut.shape[0]}" + (
            ", uniform" if self.uniform else ""
        )

    def forward(self) -> torch.Tensor:
        return decode(self.lut, self.indices, self.shape, self.dtype)

    def set_kernel(self, kernel: str) -> None:
        """Choose how :meth:`linear` computes: ``auto`` | ``eager`` | ``decode`` (exact) or ``int8`` (approximate)."""
        self.kernel = check_kernel(kernel)
        self.int8 = None
        self.views = None  # the packed copy exists only for the kernels that read it
        if kernel == "int8":
            rows = self.shape[0]
            self.int8 = Int8Weight.from_rows(
                lambda r: decode_rows(self.lut, self.indices, self.shape, self.dtype, r), rows
            )

    def kernel_views(self) -> KernelViews:
        """The kernels' views of the current buffers, rebuilt when they change (packed for the native kernel)."""
        if self.views is None or not self.views.fits(self.lut, self.indices, self.dtype):
            packed = self.kernel in ("auto", "native") and self.indices.device.type == "cpu"
            self.views = KernelViews.of(self.lut, self.indices, self.shape, self.dtype, packed)
        return self.views

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear(x, self(), bias)`` without materialising ``self()`` (exact unless kernel == "int8")."""
        views = self.kernel_views()
        return lut_linear(x, self.lut, self.indices, self.shape, self.dtype, bias, self.kernel, self.int8, views)

    def embedding(
        self,
        ids: torch.Tensor,
        padding_idx: int | None = None,
        max_norm: float | None = None,
        norm_type: float = 2.0,
        scale_grad_by_freq: bool = False,
        sparse: bool = False,
    ) -> torch.Tensor:
        """``F.embedding(ids, self(), ...)`` decoding only the rows of ``ids``."""
        return lut_embedding(
            ids,
            self.lut,
            self.indices,
            self.shape,
            self.dtype,
            padding_idx,
            max_norm,
            norm_type,
            scale_grad_by_freq,
            sparse,
            self.kernel_views().packed if self.kernel in ("auto", "native") else None,
        )


class LUTModule(WrappedLayer):
    """A Linear / Embedding / Conv1D layer computing with a decoded LUT weight (no weight Parameter)."""

    def __init__(self, base: nn.Module, lut: LUTWeight) -> None:
        super().__init__(base)
        self.__dict__.pop("weight", None)
        self._parameters.pop("weight", None)
        self.lut = lut

    @property
    def weight(self) -> torch.Tensor:  # decoded in the stored layout, for code that inspects `.weight`
        return self.rows_first(self.lut())

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if self.shell is not None or self.transposed:  # Conv1D, or a subclass's own forward, on the decoded weight
            return self._compute(x, self.lut(), *args, **kwargs)
        if self.base_type == "Linear":
            return self.lut.linear(x, self.bias)
        return self.lut.embedding(
            x, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )


def set_lut_kernel(model: nn.Module, kernel: str) -> nn.Module:
    """Set the kernel of every LUT Linear in ``model`` (see :mod:`edkm.kernels.linear`); returns ``model``."""
    check_kernel(kernel)
    for module in model.modules():
        if isinstance(module, LUTModule) and module.base_type == "Linear" and module.lut.kernel != kernel:
            module.lut.set_kernel(kernel)
    return model
