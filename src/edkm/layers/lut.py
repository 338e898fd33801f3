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
from edkm.kernels import (
    Int8Weight,
    KernelViews,
    check_kernel,
    decode_rows,
    lut_embedding,
    lut_linear,
    native,
    packed_linear,
)
from edkm.kernels.layout import group_layout, weight_rows_cols
from edkm.layers.base import WrappedLayer

LUT_DTYPE = torch.float16


def uniform_levels(lo: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """fp16 LUT (G, 2^bits) of the evenly spaced levels ``lo + step * j`` (fp32 math, (G, 1) inputs)."""
    return (lo.float() + step.float() * torch.arange(1 << bits, dtype=torch.float32, device=lo.device)).to(LUT_DTYPE)


def compactable(shape: torch.Size, groups: int, dtype: torch.dtype) -> bool:
    """Whether a weight of ``shape`` with ``groups`` LUTs decoded in ``dtype`` can keep the native kernel's rows
    only (:meth:`LUTWeight.compact_`): a built kernel, at most 32-bit floats, groups of whole rows or of equal
    column ranges within a row.

    >>> compactable(torch.Size([6, 4]), 3, torch.float32) == native.available()   # groups of 2 rows
    True
    >>> compactable(torch.Size([6, 4]), 4, torch.float32)                           # 6 weights straddle rows
    False
    """
    rows, cols = weight_rows_cols(shape)
    layout = group_layout(shape, rows * cols // max(groups, 1))
    return layout is not None and torch.finfo(dtype).bits <= 32 and native.available()


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

    @property
    def indices(self) -> torch.Tensor:
        """uint8 indices (G, n): the buffer, or (after :meth:`compact_`) unpacked from the bit-packed rows, a copy:
        edit a compact weight's indices by assigning them (``w.indices = new``), which also makes it plain again."""
        buffers = self.__dict__["_buffers"]
        if buffers.get("indices") is not None:
            return buffers["indices"]
        if buffers.get("packed") is None:
            raise AttributeError("indices")
        rows, cols = weight_rows_cols(self.shape)
        packed = buffers["packed"]
        flat = native.unpack(packed.cpu(), self.bits, cols).to(packed.device)  # the kernel unpacks CPU rows only
        return flat.reshape(self.lut.shape[0], -1)

    def __setattr__(self, name: str, value: object) -> None:
        if name == "indices" and value is not None and "packed" in self.__dict__.get("_buffers", {}):
            del self._buffers["packed"]  # new uint8 indices replace the packed rows
            self.__dict__["views"] = None
        super().__setattr__(name, value)

    @property
    def compact(self) -> bool:
        """Whether only the native kernel's bit-packed indices are kept (see :meth:`compact_`)."""
        return self.__dict__["_buffers"].get("indices") is None

    def compact_(self) -> bool:
        """Keep the indices bit-packed (the native kernel's rows: ~b/8 bytes per weight) instead of one byte each.

        For inference on CPU: the native kernel reads these rows; anything that needs the uint8 indices
        (export, other kernels, gradients) unpacks them on use (:attr:`indices`), bit for bit the same.
        Returns whether it did: CPU buffers, a built native kernel, a row or column LUT layout (see
        :func:`compactable`).

        >>> w = LUTWeight(torch.tensor([[0.5, -1.0]], dtype=torch.float16),
        ...               torch.tensor([[0, 1, 1, 0]], dtype=torch.uint8), torch.Size([2, 2]), 1, torch.float32)
        >>> before = w()
        >>> w.compact_() == native.available(), torch.equal(w(), before)
        (True, True)
        """
        if self.compact:
            return True
        if self.indices.device.type != "cpu" or not compactable(self.shape, self.lut.shape[0], self.dtype):
            return False
        self._buffers["packed"] = native.pack(self.indices.reshape(weight_rows_cols(self.shape)), self.bits)
        self._buffers["indices"] = None  # a None buffer: not in state_dict, `indices` unpacks
        self.views = None
        return True

    @classmethod
    def from_rows(
        cls,
        lut: torch.Tensor,
        packed: torch.Tensor,
        shape: torch.Size,
        bits: int,
        dtype: torch.dtype,
        uniform: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> LUTWeight:
        """A compact weight (see :meth:`compact_`) of the native kernel's rows ``packed`` (rows, ``native.stride``).

        >>> idx = torch.tensor([[0, 1, 1, 0]], dtype=torch.uint8)
        >>> lut = torch.tensor([[0.5, -1.0]], dtype=torch.float16)
        >>> w = LUTWeight.from_rows(lut, native.pack(idx.reshape(2, 2), 1), torch.Size([2, 2]), 1, torch.float32)
        >>> w.compact, torch.equal(w.indices, idx)
        (True, True)
        """
        weight = cls(lut, None, shape, bits, dtype, uniform)
        weight._buffers["packed"] = packed
        return weight

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
        if self.compact:
            packed = self._buffers["packed"]
            if self.views is None or not self.views.fits(self.lut, packed, self.dtype):
                weight = native.PackedWeight.of_packed(self.lut, packed, self.shape, self.dtype)
                self.views = KernelViews(None, None, KernelViews.key_of(self.lut, packed, self.dtype), weight)
            return self.views
        if self.views is None or not self.views.fits(self.lut, self.indices, self.dtype):
            packed = self.kernel in ("auto", "native") and self.indices.device.type == "cpu"
            self.views = KernelViews.of(self.lut, self.indices, self.shape, self.dtype, packed)
        return self.views

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``F.linear(x, self(), bias)`` without materialising ``self()`` (exact unless kernel == "int8")."""
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
        if self.compact and self.kernel in ("auto", "native") and x.device.type == "cpu" and not needs_grad:
            return packed_linear(x, self.kernel_views().packed, bias)
        views = None if self.compact else self.kernel_views()  # compact + another kernel: indices unpacked per call
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
        packed = self.kernel_views().packed if self.kernel in ("auto", "native") else None
        unpacked = packed is None or max_norm is not None or ids.device.type != "cpu"
        return lut_embedding(
            ids,
            self.lut,
            self.indices if unpacked else None,  # a compact weight unpacks only where the native rows cannot serve
            self.shape,
            self.dtype,
            padding_idx,
            max_norm,
            norm_type,
            scale_grad_by_freq,
            sparse,
            packed,
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
