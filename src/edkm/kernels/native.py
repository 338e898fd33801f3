"""The native CPU kernel (``csrc/edkm_lut.cpp``, a PyTorch C++ extension): LUT GEMV on bit-packed indices.

Why our own C++: no maintained library provides LUT GEMV for arbitrary per-tensor codebooks on x86 (torchao's
groupwise-LUT kernels are aarch64-only, T-MAC needs weights linear in their bits, Inductor emits no in-register
table lookups), and decoding in registers is what makes a 3-bit model read ~1/10 of fp32's bytes per token.

The extension multiplies by LUT + b-bit-index weights without materialising them: a packed row is
decoded in SIMD registers (AVX-512 / AVX2 table permutes) and fed straight into fp32 FMAs. It is
JIT-compiled on first use with ``torch.utils.cpp_extension.load`` into a cache directory whose
name carries a hash of the source and flags (edits rebuild). :func:`load` never raises: without a
compiler, or if the build fails, it returns ``(None, reason)`` and the caller keeps its exact,
slow kernels.

Exactness: every weight equals ``lut.to(dtype).float()[index]`` exactly (as ``edkm.decode``), the
sums are fp32; only the order of the additions differs from decode-then-matmul.

Example:
    >>> import torch
    >>> lut = torch.tensor([[0.5, -1.0]], dtype=torch.float16)       # one LUT, 1 bit
    >>> idx = torch.tensor([[0, 1, 1, 0]], dtype=torch.uint8)         # a 2 x 2 weight
    >>> w = PackedWeight.from_lut(lut, idx, torch.Size([2, 2]), torch.float32)
    >>> linear(torch.ones(3, 2), w)
    tensor([[-0.5000, -0.5000],
            [-0.5000, -0.5000],
            [-0.5000, -0.5000]])
    >>> embedding(torch.tensor([1, 0]), w)
    tensor([[-1.0000,  0.5000],
            [ 0.5000, -1.0000]])
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch

from edkm.kernels.layout import group_layout, weight_rows_cols

CSRC = Path(__file__).resolve().with_name("csrc")
SOURCES = (CSRC / "edkm_lut.cpp", CSRC / "edkm_step.cpp")  # the kernels; the lean decode step built on them
HEADERS = (CSRC / "edkm_lut.h",)
CFLAGS = ("-O3", "-fopenmp")  # no -march: one build runs on any x86-64; ISA chosen at run time
LDFLAGS = ("-fopenmp",)
GEMV_MAX_TOKENS = 16  # measured crossover (3-bit, 1 thread): fused GEMV up to ~16-24 tokens, then tiles + GEMM
ISAS = ("auto", "avx512vbmi", "avx512", "avx2", "scalar")


def default_cache_dir() -> Path:
    """``$EDKM_KERNEL_CACHE`` or ``~/.cache/edkm/kernels``."""
    return Path(os.environ.get("EDKM_KERNEL_CACHE", Path.home() / ".cache" / "edkm" / "kernels"))


def build_name() -> str:
    """Extension name: ``edkm_lut_<hash of source, flags and torch version>``."""
    h = hashlib.sha256()
    for path in (*SOURCES, *HEADERS):
        h.update(path.read_bytes())
    h.update(repr((CFLAGS, LDFLAGS, torch.__version__)).encode())
    return f"edkm_lut_{h.hexdigest()[:16]}"


def load(cache_dir: str | os.PathLike | None = None, verbose: bool = False) -> tuple[ModuleType | None, str]:
    """``(module, "")`` with the compiled extension, or ``(None, one-line reason)``; never raises on a failed build.

    ``cache_dir``: where builds live (default :func:`default_cache_dir`); each source version
    gets its own sub-directory. The result is cached per process and folder (like torch's own extension cache).
    """
    return _load(str(Path(cache_dir) if cache_dir is not None else default_cache_dir()), verbose)


@functools.cache
def _load(root_name: str, verbose: bool) -> tuple[ModuleType | None, str]:
    root = Path(root_name)
    try:
        name = build_name()
        cxx = os.environ.get("CXX", "c++")
        if shutil.which(cxx) is None:
            result: tuple[ModuleType | None, str] = (None, f"no C++ compiler ({cxx!r} not found)")
        else:
            from torch.utils import cpp_extension  # deferred: only when the kernel is first built or loaded

            build_dir = root / name
            build_dir.mkdir(parents=True, exist_ok=True)
            mod = cpp_extension.load(
                name=name,
                sources=[str(path) for path in SOURCES],
                extra_cflags=list(CFLAGS),
                extra_ldflags=list(LDFLAGS),
                build_directory=str(build_dir),
                verbose=verbose,
            )
            result = (mod, "")
    except Exception as e:  # noqa: BLE001 - any build failure means "use the slow kernels"
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        result = (None, f"edkm_lut build failed: {type(e).__name__}: {lines[0] if lines else ''}"[:300])
    return result


def ext() -> ModuleType:
    """The extension from the default cache (built on first call); RuntimeError with the reason if unavailable."""
    mod, reason = load()
    if mod is None:
        raise RuntimeError(reason)
    return mod


def available() -> bool:
    """Whether the extension builds and loads here."""
    return load()[0] is not None


class PackedWeight(NamedTuple):
    """A packed LUT weight: element (r, c) = ``table[r // R, c // C, idx[r, c]]``.

    ``packed``: uint8 (rows, stride) from :func:`pack`; ``table``: fp32 (rows // R, cols // C, k), the LUT
    values already cast to the layer dtype (so equal to ``edkm.decode``'s); ``dtype``: the layer dtype
    (outputs are cast to it, exactly, as every table entry is a ``dtype`` value).
    """

    packed: torch.Tensor
    table: torch.Tensor
    bits: int
    rows: int
    cols: int
    R: int
    C: int
    dtype: torch.dtype = torch.float32

    @classmethod
    def from_lut(cls, lut: torch.Tensor, indices: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> PackedWeight:
        """From edkm's ``lut (G, k)`` and ``indices (G, n)`` of a weight of ``shape`` in ``dtype``.

        Groups are as in ``edkm.kernels.layout.grid``: ``rows`` layout if ``n % cols == 0``
        (a group is ``R = n // cols`` whole rows), else ``cols`` layout if ``cols % n == 0``
        (``C = n`` input channels within a row); anything else is a ValueError.

        >>> lut = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, -1.0, -2.0, -3.0]])
        >>> idx = torch.tensor([[1, 2, 3], [3, 0, 1]], dtype=torch.uint8)   # two 3-weight groups
        >>> pw = PackedWeight.from_lut(lut, idx, torch.Size([1, 6]), torch.float32)
        >>> (pw.bits, pw.R, pw.C, tuple(pw.table.shape))
        (2, 1, 3, (1, 2, 4))
        """
        rows, cols = weight_rows_cols(shape)
        return cls.of_packed(lut, pack(indices.reshape(rows, cols), bits_of(lut)), shape, dtype)

    @classmethod
    def of_packed(cls, lut: torch.Tensor, packed: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> PackedWeight:
        """The weight of already packed rows (:func:`pack` of the indices of ``lut``'s groups; a compact LUTWeight).

        >>> lut = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
        >>> idx = torch.tensor([[3, 2, 1, 0]], dtype=torch.uint8)
        >>> a = PackedWeight.from_lut(lut, idx, torch.Size([2, 2]), torch.float32)
        >>> b = PackedWeight.of_packed(lut, a.packed, torch.Size([2, 2]), torch.float32)
        >>> (a.R, a.C) == (b.R, b.C) and torch.equal(a.table, b.table)
        True
        """
        groups, k = lut.shape
        bits = bits_of(lut)
        rows, cols = weight_rows_cols(shape)
        n = rows * cols // groups
        table = lut.to(dtype).float()
        layout = group_layout(shape, n)
        if layout == "rows":
            R, C, table = n // cols, cols, table.reshape(groups, 1, k).contiguous()
        elif layout == "cols":
            R, C, table = 1, n, table.reshape(rows, cols // n, k).contiguous()
        else:
            raise ValueError(f"groups of {n} weights straddle rows of {cols}: no row/column layout")
        return cls(packed, table, bits, rows, cols, R, C, dtype)


def bits_of(lut: torch.Tensor) -> int:
    """b of a (G, 2^b) LUT; a ValueError unless 2^b entries with b in 1..8."""
    k = lut.shape[1]
    bits = k.bit_length() - 1
    if k != 1 << bits or not 1 <= bits <= 8:
        raise ValueError(f"LUT size must be 2^bits with bits in 1..8, got {k}")
    return bits


def pack(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 indices (rows, cols) into the kernel's row layout: uint8 (rows, stride).

    >>> idx = torch.randint(0, 8, (5, 40), dtype=torch.uint8)
    >>> p = pack(idx, 3)
    >>> tuple(p.shape), torch.equal(unpack(p, 3, 40), idx)
    ((5, 32), True)
    """
    return ext().pack_rows(indices.to(torch.uint8), int(bits))


def stride(bits: int, cols: int) -> int:
    """Bytes per packed row of ``cols`` ``bits``-bit indices (the ``packed`` tensor's second dimension)."""
    return int(ext().packed_stride(int(bits), int(cols)))


def pack_dense(stream: torch.Tensor, bits: int, cols: int, out: torch.Tensor, bit_offset: int = 0) -> torch.Tensor:
    """Fill ``out`` (rows, :func:`stride`) with the rows of a densely packed stream (:mod:`edkm.export.pack`'s
    layout, the first value at bit ``bit_offset``): a file's indices become kernel rows without a uint8 copy.

    >>> from edkm.export.pack import pack_bits
    >>> idx = torch.randint(0, 8, (5, 40), dtype=torch.uint8)
    >>> rows = pack_dense(pack_bits(idx, 3), 3, 40, torch.empty(5, stride(3, 40), dtype=torch.uint8))
    >>> torch.equal(rows, pack(idx, 3))
    True
    """
    ext().pack_dense_into(out, stream.contiguous(), int(bit_offset), int(bits), int(cols))
    return out


def unpack(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 indices (rows, cols)."""
    return ext().unpack_rows(packed, int(bits), int(cols))


def linear(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None, isa: str = "auto") -> torch.Tensor:
    """``F.linear(x, W, bias)`` for a packed ``W``; ``x`` (..., cols), any leading dims.

    Up to :data:`GEMV_MAX_TOKENS` tokens run the fused GEMV (each weight read once for all tokens),
    more run decoded row tiles + ``torch.mm`` (prefill). Computed in fp32, returned in ``x.dtype``.

    >>> lut = torch.tensor([[1.0, 2.0]])
    >>> idx = torch.tensor([[1, 0, 0, 1]], dtype=torch.uint8)
    >>> w = PackedWeight.from_lut(lut, idx, torch.Size([2, 2]), torch.float32)
    >>> linear(torch.tensor([[[1.0, 10.0]]]), w, bias=torch.tensor([0.5, 0.0]))
    tensor([[[12.5000, 21.0000]]])
    """
    if x.shape[-1] != w.cols:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {w.cols}")
    x2 = x.reshape(-1, w.cols).to(torch.float32)
    m = ext()
    if x2.shape[0] <= GEMV_MAX_TOKENS:
        y = m.gemv(x2, w.packed, w.table, w.bits, w.rows, w.cols, w.R, w.C, isa)
    else:
        y = m.linear_tiled(x2, w.packed, w.table, w.bits, w.rows, w.cols, w.R, w.C, 0, isa)
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype).reshape(*x.shape[:-1], w.rows)


def embedding(ids: torch.Tensor, w: PackedWeight, isa: str = "auto") -> torch.Tensor:
    """``F.embedding(ids, W)`` decoding only the rows asked for, in ``w.dtype``.

    >>> lut = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    >>> idx = torch.tensor([[3, 2, 1, 0]], dtype=torch.uint8)
    >>> w = PackedWeight.from_lut(lut, idx, torch.Size([2, 2]), torch.float32)
    >>> embedding(torch.tensor([[1], [0]]), w)
    tensor([[[1., 0.]],
    <BLANKLINE>
            [[3., 2.]]])
    """
    rows = ext().decode_rows(w.packed, w.table, ids.reshape(-1), w.bits, w.rows, w.cols, w.R, w.C, isa)
    return rows.to(w.dtype).reshape(*ids.shape, w.cols)


def decode_range(w: PackedWeight, rows: slice, isa: str = "auto") -> torch.Tensor:
    """Rows ``rows`` (a slice) of the decoded weight in ``w.dtype``: bit for bit ``edkm.decode(...)[rows]``."""
    return embedding(torch.arange(w.rows)[rows], w, isa)


def supported_isas() -> list[str]:
    """The ISAs this CPU (and build) can run, for ``isa=``: always ``scalar``, then ``avx2``, ``avx512``."""
    return list(ext().supported_isas())
