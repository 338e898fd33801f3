"""Dense b-bit packing of LUT indices: n values of b bits take ceil(n * b / 8) bytes.

Bits are laid out least-significant first: value i occupies bits [i*b, (i+1)*b) of the stream,
and stream bit j is bit (j % 8) of byte j // 8.

Example:
    >>> import torch
    >>> from edkm.export.pack import pack_bits, unpack_bits
    >>> v = torch.tensor([5, 0, 7, 3, 1], dtype=torch.uint8)
    >>> packed = pack_bits(v, 3)
    >>> packed.numel(), torch.equal(unpack_bits(packed, 3, 5), v)
    (2, True)
"""

from __future__ import annotations

import torch

_CHUNK = 1 << 18  # values per chunk (a multiple of 8 keeps every chunk byte-aligned for any b; ~6 MB of temporaries)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer from 1 to 8, got {bits!r}")


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes taken by n packed b-bit values."""
    return (n * bits + 7) // 8


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer values in [0, 2^bits) into a 1-D uint8 tensor (8 values -> ``bits`` bytes at a time)."""
    _check_bits(bits)
    v = values.reshape(-1)
    if v.numel() and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"values must lie in [0, {1 << bits}) to pack into {bits} bits")
    value_shift = torch.arange(8, dtype=torch.int64) * bits
    byte_shift = torch.arange(bits, dtype=torch.int64) * 8
    out = []
    for chunk in v.split(_CHUNK):
        octets = torch.nn.functional.pad(chunk.to(torch.int64), (0, -chunk.numel() % 8)).reshape(-1, 8)
        word = (octets << value_shift).sum(1, keepdim=True)  # 8 values in 8*bits <= 64 bits
        out.append(((word >> byte_shift) & 0xFF).to(torch.uint8).reshape(-1))
    packed = torch.cat(out) if out else torch.empty(0, dtype=torch.uint8)
    return packed[: packed_nbytes(v.numel(), bits)]


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``n`` values as uint8."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_nbytes(n, bits):
        raise ValueError(
            f"expected {packed_nbytes(n, bits)} packed uint8 bytes for {n} values of {bits} bits, "
            f"got {tuple(packed.shape)} {packed.dtype}"
        )
    value_shift = torch.arange(8, dtype=torch.int64) * bits
    byte_shift = torch.arange(bits, dtype=torch.int64) * 8
    values = torch.empty(packed_nbytes(n, bits) * 8 // bits, dtype=torch.uint8)  # filled in place: no concatenation
    for i, chunk in enumerate(packed.split(_CHUNK // 8 * bits)):
        groups = torch.nn.functional.pad(chunk.to(torch.int64), (0, -chunk.numel() % bits)).reshape(-1, bits)
        word = (groups << byte_shift).sum(1, keepdim=True)
        part = ((word >> value_shift) & ((1 << bits) - 1)).reshape(-1)
        start = i * _CHUNK
        values[start : start + part.numel()] = part[: values.numel() - start]
    return values[:n]
