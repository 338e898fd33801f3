"""Reading a packed file one piece at a time: the native kernel's rows built as the file is read.

:func:`read_streamed` gives what :func:`~edkm.export.format.read_packed` gives (header, tensors; checksum and
finiteness checked) except that every layer the native kernel can hold (:func:`native_shape`) comes as
``<layer>.packed``, the kernel's rows, instead of ``<layer>.indices``: the densely packed indices are read in
chunks of about :data:`CHUNK` bytes and converted as they arrive. The load then holds about the file's size
(the rows take ~b/8 bytes per weight, as in the file) plus one chunk, where reading the file whole and then
converting it held twice that.

Why by hand: safetensors' readers either read every tensor at once (``load_file``) or map the whole file
(``safe_open``: every page read stays resident while the file is open); neither reads part of a tensor into
memory of our own. This module reads byte ranges with ``os.pread`` at the offsets of the file's own header
(safetensors' documented layout: an 8-byte little-endian header length, the JSON header, then the data),
after :func:`~edkm.export.format.inspect_file` has validated it with safetensors itself.

Example:
    >>> import torch, edkm, tempfile, os
    >>> from edkm.kernels import native
    >>> model = edkm.rtn_(torch.nn.Sequential(torch.nn.Linear(64, 8)), edkm.PalettizeConfig(bits=3))
    >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
    >>> edkm.save_palettized(model, path)
    >>> packed, tensors = read_streamed(path)
    >>> sorted(tensors) == (["0.bias", "0.lo", "0.packed", "0.step"] if native.available() else
    ...                     ["0.bias", "0.indices", "0.lo", "0.step"])
    True
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from edkm.export.errors import FormatError
from edkm.export.format import PackedFile, inspect_file
from edkm.export.layers import digest_start, digest_update
from edkm.export.validate import PackedLayer, check_finite
from edkm.kernels import native
from edkm.kernels.layout import weight_rows_cols
from edkm.layers.lut import compactable

CHUNK = 1 << 20  # bytes of packed indices read and converted at a time
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


def native_shape(layer: PackedLayer) -> tuple[int, int] | None:
    """(rows, bytes per row) of the native kernel's rows of ``layer``, or None where it cannot hold them."""
    if not compactable(torch.Size(layer.shape), layer.groups, layer.dtype):
        return None
    rows, cols = weight_rows_cols(torch.Size(layer.shape))
    return rows, native.stride(layer.bits, cols)


def read_streamed(path: str | os.PathLike) -> tuple[PackedFile, dict[str, torch.Tensor]]:
    """The validated header and tensors of a packed file, kernel rows for every layer of :func:`native_shape`."""
    packed = inspect_file(path)
    version = packed.header["version"]
    header = {k: v for k, v in packed.header.items() if k != "sha256"} if version >= 3 else None
    to_rows = {f"{name}.indices": layer for name, layer in packed.layers.items() if native_shape(layer)}
    h = digest_start(header)
    tensors: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        ranges = byte_ranges(f, packed.path)
        for key in sorted(packed.table):
            dtype, shape = packed.table[key]
            start, end = ranges[key]
            layer = to_rows.get(key)
            if layer is None:
                data = read_range(f, start, end, packed.path)
                digest_update(h, key, DTYPES[dtype], shape, [data], header is not None)
                tensors[key] = as_tensor(data, DTYPES[dtype], shape)
            else:
                digest_update(h, key, torch.uint8, shape, [], header is not None)
                tensors[f"{layer.name}.packed"] = read_rows(f, layer, start, end, h, packed.path)
    if h.hexdigest() != packed.header["sha256"]:
        raise FormatError(f"{path}: checksum mismatch, the file is corrupted")
    for name, layer in packed.layers.items():
        parts = {p: tensors[f"{name}.{p}"] for p in layer.tensor_specs() if f"{name}.{p}" in tensors}
        check_finite(layer, parts, str(path))
    return packed, tensors


def byte_ranges(f, where: Path) -> dict[str, tuple[int, int]]:
    """Absolute (start, end) byte offsets of every tensor, from the safetensors header."""
    try:
        (n,) = struct.unpack("<Q", f.read(8))
        entries = json.loads(f.read(n))
        return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1]) for k, v in entries.items()
                if k != "__metadata__"}  # fmt: skip
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as err:
        raise FormatError(f"{where}: cannot read the safetensors header (corrupted?): {err}") from err


def read_range(f, start: int, end: int, where: Path) -> bytearray:
    """Bytes [start, end) of the file; FormatError when the file ends first."""
    data = bytearray(end - start)
    view, done = memoryview(data), 0
    while done < len(data):
        got = os.preadv(f.fileno(), [view[done:]], start + done)
        if got <= 0:
            raise FormatError(f"{where} ends at byte {start + done}, a tensor needs {end} (truncated?)")
        done += got
    return data


def as_tensor(data: bytearray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor over ``data`` (no copy)."""
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape)


def read_rows(f, layer: PackedLayer, start: int, end: int, h, where: Path) -> torch.Tensor:
    """The kernel's rows of the layer's packed indices at [start, end), hashed into ``h`` as they are read."""
    rows, stride = native_shape(layer)
    cols = weight_rows_cols(torch.Size(layer.shape))[1]
    out = torch.empty(rows, stride, dtype=torch.uint8)
    for r0, r1, b0, b1 in row_chunks(rows, cols, layer.bits, end - start):
        data = read_range(f, start + b0, start + b1, where)
        h.update(data)
        native.pack_dense(torch.frombuffer(data, dtype=torch.uint8), layer.bits, cols, out[r0:r1])
    return out


def row_chunks(rows: int, cols: int, bits: int, nbytes: int) -> Iterator[tuple[int, int, int, int]]:
    """(first row, end row, first byte, end byte) of consecutive chunks of about :data:`CHUNK` bytes, each
    starting on a byte boundary of the stream; the last one ends at the stream's end (``nbytes``).

    >>> list(row_chunks(5, 3, 3, 6))   # 9 bits per row: chunks of 8 rows start on byte boundaries
    [(0, 5, 0, 6)]
    """
    row_bits = cols * bits
    step = 8 // math.gcd(row_bits, 8)  # rows per byte-aligned unit
    per = max(step, (CHUNK * 8 // max(row_bits, 1)) // step * step)
    for r0 in range(0, rows, per):
        r1 = min(rows, r0 + per)
        yield r0, r1, r0 * row_bits // 8, nbytes if r1 == rows else r1 * row_bits // 8
