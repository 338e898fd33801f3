"""Packed Linear and Embedding forwards that never hold a whole decoded weight.

Kernels (``LUTWeight.kernel``, see :data:`KERNELS`):

* ``"auto"`` (default): on CPU, up to :data:`NATIVE_MAX_TOKENS` tokens go through the native C++ GEMV
  (:mod:`.native`: bit-packed indices decoded in SIMD registers, fp32 sums), more tokens (prefill) through the
  tiled kernel; exact either way. Without a C++ compiler (said once as a warning) the compiled fused GEMV
  (:mod:`.gemv`) takes up to :data:`GEMV_MAX_TOKENS` tokens, and without a working ``torch.compile`` the tiled
  kernel does everything.
* ``"native"``: the native GEMV, an error where it cannot be built.
* ``"eager"``: always the tiled kernel: decode :data:`TILE_BYTES` of rows at a time, multiply, drop.
* ``"decode"``: decode the whole weight, then ``F.linear`` (the reference; what CUDA uses, as no
  GPU kernel exists yet).

With gradients (for the input or the bias) the same kernels run under :class:`PackedLinear`, whose
backward decodes tile by tile too.
* ``"int8"``: approximate, explicit opt-in: :mod:`.int8` (weights re-gridded to int8 per row) for up
  to :data:`GEMV_MAX_TOKENS` tokens; prefill uses the exact tiled kernel.

"Exact" means: the same weights as ``edkm.decode`` (every weight one LUT entry, cast to the layer's
dtype); only the order of the fp32 sums differs from decode-then-matmul.

Example:
    >>> import torch
    >>> lut = torch.tensor([[0.5, -1.0]], dtype=torch.float16)
    >>> idx = torch.tensor([[0, 1, 1, 0]], dtype=torch.uint8)
    >>> tiled_linear(torch.ones(3, 2), lut, idx, torch.Size([2, 2]), torch.float32, None)
    tensor([[-0.5000, -0.5000],
            [-0.5000, -0.5000],
            [-0.5000, -0.5000]])
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from edkm.cluster import decode
from edkm.kernels import native
from edkm.kernels.gemv import fused_gemv
from edkm.kernels.int8 import Int8Weight
from edkm.kernels.layout import Grid, decode_rows, grid, weight_rows_cols

KERNELS = ("auto", "native", "eager", "decode", "int8")
# tokens the native GEMV takes in "auto": it would win up to ~16 (native.GEMV_MAX_TOKENS), but beyond a few tokens
# "auto" keeps decode-then-matmul's exact sums (a prefill equals the eval-mode DKM layer bit for bit)
NATIVE_MAX_TOKENS = 4
GEMV_MAX_TOKENS = 4  # the fused GEMV decodes once per token: beyond a few tokens, tiles + GEMM win
TILE_BYTES = 1 << 22  # decoded rows per tile of the eager kernel: 4 MiB


def check_kernel(kernel: str) -> str:
    """``kernel`` if it is one of :data:`KERNELS`, else a ValueError naming them."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown LUT kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    return kernel


def tiled_linear(
    x: torch.Tensor,
    lut: torch.Tensor,
    indices: torch.Tensor,
    shape: torch.Size,
    dtype: torch.dtype,
    bias: torch.Tensor | None,
    tile_bytes: int | None = None,
    rows_of: Callable[[slice], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``F.linear(x, decode(...), bias)`` decoding ``tile_bytes`` (default :data:`TILE_BYTES`) of rows at a time.

    ``rows_of(slice)``: the decoded rows in ``dtype`` (default :func:`decode_rows` of ``lut`` / ``indices``).
    """
    rows, cols = weight_rows_cols(shape)
    rows_of = rows_of or (lambda part: decode_rows(lut, indices, shape, dtype, part))
    step = max(1, (tile_bytes or TILE_BYTES) // max(1, cols * torch.finfo(dtype).bits // 8))
    if step >= rows:  # one tile: exactly decode-then-matmul
        return F.linear(x, rows_of(slice(0, rows)).to(x.dtype), bias)
    outs = []
    for start in range(0, rows, step):
        tile = rows_of(slice(start, min(start + step, rows))).to(x.dtype)
        outs.append(F.linear(x, tile, None if bias is None else bias[start : start + step]))
        del tile
    return torch.cat(outs, dim=-1)


def packed_linear(x: torch.Tensor, w: native.PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`lut_linear`'s ``auto`` kernel on a bit-packed weight alone (a compact LUTWeight): the native GEMV up to
    :data:`NATIVE_MAX_TOKENS` tokens, else row tiles decoded by the native kernel + ``F.linear`` (the same numbers
    as :func:`tiled_linear` on the uint8 indices: the rows decode bit for bit alike)."""
    tokens = x.numel() // w.cols if w.cols else 0
    if 0 < tokens <= NATIVE_MAX_TOKENS and x.dtype == w.dtype:
        return native.linear(x, w, bias)
    shape = torch.Size([w.rows, w.cols])
    return tiled_linear(x, None, None, shape, w.dtype, bias, rows_of=lambda part: native.decode_range(w, part))


def version(t: torch.Tensor) -> int:
    """``t._version``; 0 for an inference tensor (made under ``torch.inference_mode``: it has no counter)."""
    return 0 if t.is_inference() else t._version


class KernelViews(NamedTuple):
    """What the kernels read, computed once per buffer version: grid views, the fp32 table, the packed weight."""

    grid: Grid | None
    table: torch.Tensor | None  # grid.lut as decoded values (lut -> dtype -> fp32)
    key: tuple
    packed: native.PackedWeight | None = None  # bit-packed for the native kernel (None: not asked or unavailable)

    @classmethod
    def of(
        cls, lut: torch.Tensor, indices: torch.Tensor, shape: torch.Size, dtype: torch.dtype, packed: bool = False
    ) -> KernelViews:
        """The views of these buffers; ``packed``: also the native kernel's packed copy (where it can be built)."""
        views = grid(lut, indices, shape)
        table = None if views is None else views.lut.to(dtype).float()
        weight = native_weight(lut, indices, shape, dtype) if packed and views is not None else None
        return cls(views, table, cls.key_of(lut, indices, dtype), weight)

    @staticmethod
    def key_of(lut: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> tuple:
        return (lut.data_ptr(), version(lut), tuple(lut.shape), indices.data_ptr(), tuple(indices.shape), dtype)

    def fits(self, lut: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> bool:
        """Whether these views still describe ``lut`` / ``indices`` (same storage, version, shape, dtype)."""
        return self.key == self.key_of(lut, indices, dtype)


def native_weight(
    lut: torch.Tensor, indices: torch.Tensor, shape: torch.Size, dtype: torch.dtype
) -> native.PackedWeight | None:
    """The native kernel's bit-packed copy of a CPU weight, or None (kernel unavailable: said once, as a warning)."""
    module, reason = native.load()
    if module is None:
        unavailable_once(reason)
        return None
    if lut.device.type != "cpu" or torch.finfo(dtype).bits > 32:
        return None
    return native.PackedWeight.from_lut(lut, indices, shape, dtype)


@functools.cache
def unavailable_once(reason: str) -> None:
    warnings.warn(f"edkm: native LUT kernel unavailable ({reason}); using the exact PyTorch kernels", stacklevel=3)


def lut_linear(
    x: torch.Tensor,
    lut: torch.Tensor,
    indices: torch.Tensor,
    shape: torch.Size,
    dtype: torch.dtype,
    bias: torch.Tensor | None,
    kernel: str = "auto",
    int8: Int8Weight | None = None,
    views: KernelViews | None = None,
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for the packed ``W`` (``lut``, ``indices``, ``shape``, ``dtype``) by ``kernel``.

    ``views``: :class:`KernelViews` of the same buffers, cached by the caller (computed here if None).
    """
    if kernel == "decode" or x.device.type != "cpu":  # CUDA: decode-then-matmul until a GPU kernel exists
        return F.linear(x, decode(lut, indices, shape, dtype).to(x.dtype), bias)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return PackedLinear.apply(x, bias, lut, indices, shape, dtype, kernel, int8, views)
    rows, cols = weight_rows_cols(shape)
    tokens = x.numel() // cols if cols else 0
    if kernel == "int8" and tokens <= GEMV_MAX_TOKENS:  # aten's int8 matmul is slow for many tokens: prefill is tiled
        if int8 is None:
            raise ValueError("the int8 kernel needs its re-gridded weight (LUTWeight.set_kernel('int8') builds it)")
        return int8.linear(x, bias)
    if kernel in ("auto", "native") and 0 < tokens <= NATIVE_MAX_TOKENS and x.dtype == dtype:
        views = views or KernelViews.of(lut, indices, shape, dtype, True)  # LUTWeight caches them, packed
        if views.packed is not None:
            return native.linear(x, views.packed, bias)
        if kernel == "native":
            raise RuntimeError(f"the native LUT kernel is unavailable: {native.load()[1]}")
    if kernel == "auto" and 0 < tokens <= GEMV_MAX_TOKENS and x.dtype == dtype:
        views = views or KernelViews.of(lut, indices, shape, dtype)
        y = None if views.grid is None else fused_gemv()(x.reshape(tokens, cols), views.grid.indices, views.table)
        if y is not None:
            y = y.reshape(*x.shape[:-1], rows)
            return y + bias if bias is not None else y
    return tiled_linear(x, lut, indices, shape, dtype, bias)


class PackedLinear(torch.autograd.Function):
    """:func:`lut_linear` with gradients for ``x`` and ``bias`` (the packed weight is fixed).

    Backward computes ``grad_x = grad_y @ W`` tile by tile, so autograd never holds a decoded weight.
    """

    @staticmethod
    def forward(ctx, x, bias, lut, indices, shape, dtype, kernel, int8, views):  # type: ignore[override]
        ctx.save_for_backward(lut, indices)
        ctx.shape, ctx.dtype, ctx.has_bias = shape, dtype, bias is not None
        with torch.no_grad():
            return lut_linear(x, lut, indices, shape, dtype, bias, kernel, int8, views)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        lut, indices = ctx.saved_tensors
        rows, cols = weight_rows_cols(ctx.shape)
        g = grad_y.reshape(-1, rows)
        grad_x = torch.zeros(g.shape[0], cols, dtype=grad_y.dtype, device=grad_y.device)
        step = max(1, TILE_BYTES // max(1, cols * 4))
        for start in range(0, rows, step):
            tile = decode_rows(lut, indices, ctx.shape, ctx.dtype, slice(start, start + step)).to(grad_y.dtype)
            grad_x.addmm_(g[:, start : start + step], tile)
        grad_bias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return grad_x.reshape(*grad_y.shape[:-1], cols), grad_bias, None, None, None, None, None, None, None


def lut_embedding(
    ids: torch.Tensor,
    lut: torch.Tensor,
    indices: torch.Tensor | None,
    shape: torch.Size,
    dtype: torch.dtype,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
    packed: native.PackedWeight | None = None,
) -> torch.Tensor:
    """``F.embedding(ids, W)`` decoding only the rows asked for (``max_norm``, which rewrites W, decodes it all).

    ``packed``: the native kernel's copy of the same weight, which decodes the rows (bit for bit the same);
    ``indices`` may then be None (a compact weight), unless ``max_norm`` is set or ``ids`` are not on the CPU.
    """
    if max_norm is not None or ids.device.type != "cpu":
        return F.embedding(
            ids, decode(lut, indices, shape, dtype), padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse
        )
    num, dim = weight_rows_cols(shape)
    flat = ids.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num):
        raise IndexError(f"embedding ids must lie in [0, {num}), got [{int(flat.min())}, {int(flat.max())}]")
    if packed is not None:
        return native.embedding(flat, packed).reshape(*ids.shape, dim)
    rows = decode_rows(lut, indices, shape, dtype, flat)
    return rows.reshape(*ids.shape, dim)
