"""Inference kernels of the packed (LUT + indices) layers; :class:`edkm.layers.lut.LUTModule` calls them.

* :mod:`.layout`: where a weight's LUT groups sit; exact decoding of chosen rows only.
* :mod:`.gemv`: the fused decode-and-multiply GEMV, compiled with ``torch.compile`` (exact).
* :mod:`.linear`: the dispatch (``LUTWeight.kernel``: auto / eager / decode / int8), the tiled prefill
  kernel and the row-gathering embedding.
* :mod:`.int8`: the approximate int8 re-grid (explicit opt-in, error reported).
"""

from edkm.kernels.gemv import fused_gemv, lut_gemv
from edkm.kernels.int8 import Int8Weight
from edkm.kernels.layout import decode_rows, grid
from edkm.kernels.linear import (
    KERNELS,
    KernelViews,
    PackedLinear,
    check_kernel,
    lut_embedding,
    lut_linear,
    packed_linear,
    tiled_linear,
)

__all__ = [
    "KERNELS",
    "Int8Weight",
    "KernelViews",
    "PackedLinear",
    "check_kernel",
    "decode_rows",
    "fused_gemv",
    "grid",
    "lut_embedding",
    "lut_gemv",
    "lut_linear",
    "packed_linear",
    "tiled_linear",
]
