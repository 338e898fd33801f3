"""GGUF files (llama.cpp's format) checked in milliseconds: magic, version, and the size the header says they need.

:func:`check_gguf` reads only the header (over an mmap, every read bounds-checked), so a truncated download, a
text file named ``.gguf`` or a corrupt table is refused in a fraction of a second with one line naming the problem
and the fix (:class:`GGUFError`). :mod:`edkm.models.gguf` resolves names and loads the model.

>>> import tempfile, pathlib
>>> note = pathlib.Path(tempfile.mkdtemp()) / "x.gguf"
>>> _ = note.write_text("hello world")
>>> try:
...     check_gguf(note)
... except GGUFError as error:
...     print(str(error).replace(str(note), "x.gguf"))
x.gguf is not a GGUF file (starts with b'hello wo'): pass a .gguf file, a folder with one, or a Hugging Face folder
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["GGUF_PIP", "GGUFError", "GGUFHeader", "check_gguf", "starts_with_magic"]


GGUF_PIP = "pip install 'gguf>=0.10.0'"  # transformers' minimum (GGUF_MIN_VERSION); tested with gguf 0.19.0


class GGUFError(ValueError):
    """A GGUF file or name that cannot be used; the message is one line: the problem, then the fix."""


def starts_with_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == _MAGIC
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# validating the header
# ---------------------------------------------------------------------------------------------------------------

# Why not gguf.GGUFReader: it builds a numpy view per metadata item, so a real vocabulary (SmolLM2: 49,152 tokens +
# 48,900 merges) takes ~2 s to open, and a truncated file fails with an opaque "cannot reshape array of size ..."
# from deep inside it. The format is simple (docs/gguf.md in ggml): a fixed 24-byte prefix, then key/values, then
# the tensor table, then the data aligned to `general.alignment`. Walking it with `struct` over an mmap reads only
# the header pages: milliseconds, and every read is bounds-checked so a short or corrupt file gets a clear message.
# The only thing taken from the gguf package (when installed) is its table of ggml block sizes.

_MAGIC = b"GGUF"
_VERSIONS = (2, 3)  # what transformers' readers accept (v1 used 32-bit counts and is gone from the wild)
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 8  # ggml has 4; anything far beyond is a corrupt table
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# ggml type id -> (elements per block, bytes per block); gguf.constants.GGML_QUANT_SIZES (gguf 0.19.0) as of writing
_FALLBACK_SIZES = {
    0: (1, 4),
    1: (1, 2),
    2: (32, 18),
    3: (32, 20),
    6: (32, 22),
    7: (32, 24),
    8: (32, 34),
    9: (32, 40),
    10: (256, 84),
    11: (256, 110),
    12: (256, 144),
    13: (256, 176),
    14: (256, 210),
    15: (256, 292),
    16: (256, 66),
    17: (256, 74),
    18: (256, 98),
    19: (256, 50),
    20: (32, 18),
    21: (256, 110),
    22: (256, 82),
    23: (256, 136),
    24: (1, 1),
    25: (1, 2),
    26: (1, 4),
    27: (1, 8),
    28: (1, 8),
    29: (256, 56),
    30: (1, 2),
    34: (256, 54),
    35: (256, 66),
    39: (32, 17),
    40: (64, 36),
    41: (128, 18),
}


class GGUFHeader(NamedTuple):
    """What :func:`check_gguf` read: enough to describe the file and to check its size."""

    path: Path
    version: int
    architecture: str | None  # `general.architecture`, e.g. "llama"
    name: str | None  # `general.name`
    tensor_count: int
    kv_count: int
    alignment: int
    data_start: int  # byte offset of the tensor data
    data_bytes: int  # bytes the tensor data needs (up to the end of the last tensor)
    file_size: int

    @property
    def needed_size(self) -> int:
        return self.data_start + self.data_bytes


class _Truncated(Exception):
    """Internal: a read ran past the end of the file."""


class _Cursor:
    """Bounds-checked little-endian reads over a buffer."""

    def __init__(self, buf: Any, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated(self.pos + max(n, 0))

    def unpack(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n)
        values = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return values[0] if len(values) == 1 else values

    def skip(self, n: int) -> None:
        self.need(n)
        self.pos += n

    def string(self) -> bytes:
        n = self.unpack("<Q")
        self.need(n)
        s = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return s


def _block_sizes() -> dict[int, tuple[int, int]]:
    try:
        # deferred: gguf is optional (the header check works without it, from the table above)
        from gguf.constants import GGML_QUANT_SIZES
    except (ImportError, AttributeError, TypeError, ValueError):  # gguf missing or reorganised: the table above
        return dict(_FALLBACK_SIZES)
    return {int(t): (int(b), int(n)) for t, (b, n) in GGML_QUANT_SIZES.items()}


def check_gguf(path: str | Path) -> GGUFHeader:
    """Validate a GGUF file's header and size without reading its tensor data; return what it says.

    Checks the magic bytes, the version (2 or 3, little-endian), that the key/value and tensor tables parse within
    the file, that every tensor has a known ggml type and a whole number of blocks, and that the file holds all the
    tensor data the table describes. Raises :class:`GGUFError` (one line) otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path} is not a file: pass a .gguf file, a folder with one, or a Hugging Face folder")
    size = path.stat().st_size
    if size == 0:
        raise GGUFError(f"{path} is empty (0 bytes): download or copy it again")
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != _MAGIC:
            if head.startswith(b"version https://git-lfs"):
                raise GGUFError(f"{path} is a Git LFS pointer, not the model: run `git lfs pull` in its repository")
            raise GGUFError(
                f"{path} is not a GGUF file (starts with {head[:8]!r}): "
                "pass a .gguf file, a folder with one, or a Hugging Face folder"
            )
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _parse(path, buf, size)
            except _Truncated as short:
                raise GGUFError(
                    f"{path} is truncated: {size} bytes, its header alone needs more than {short.args[0]}: "
                    "download or copy it again"
                ) from None


def _parse(path: Path, buf: Any, size: int) -> GGUFHeader:
    cur = _Cursor(buf, size)
    cur.skip(4)
    version = _read_version(cur, path)
    tensor_count, kv_count = cur.unpack("<QQ")
    # every key/value takes >= 12 bytes and every tensor entry >= 24: absurd counts mean a corrupt header
    if kv_count * 12 + tensor_count * 24 > size - cur.pos:
        raise _Truncated(cur.pos + kv_count * 12 + tensor_count * 24)
    wanted, alignment = _read_metadata(cur, path, kv_count)
    data_bytes = _tensor_data_bytes(cur, path, tensor_count)
    data_start = (cur.pos + alignment - 1) // alignment * alignment
    if data_start + data_bytes > size:
        raise GGUFError(
            f"{path} is truncated: {size} bytes, the header describes {data_start + data_bytes}: "
            "download or copy it again"
        )
    arch, name = (wanted[k] for k in (b"general.architecture", b"general.name"))
    return GGUFHeader(
        path,
        version,
        arch if isinstance(arch, str) else None,
        name if isinstance(name, str) else None,
        tensor_count,
        kv_count,
        alignment,
        data_start,
        data_bytes,
        size,
    )


def _read_version(cur: _Cursor, path: Path) -> int:
    """The format version after the magic; a big-endian or unsupported one is refused."""
    version = cur.unpack("<I")
    if version not in _VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in _VERSIONS:
            raise GGUFError(
                f"{path} is a big-endian GGUF (v{swapped}): transformers reads little-endian files only; "
                "convert it again without --bigendian"
            )
        raise GGUFError(
            f"{path} is GGUF version {version}, supported: {', '.join(map(str, _VERSIONS))}: "
            "convert it again with a current llama.cpp"
        )
    return version


def _read_metadata(cur: _Cursor, path: Path, kv_count: int) -> tuple[dict[bytes, Any], int]:
    """Walk the key/value table: (the `general.*` values kept, the checked data alignment)."""
    wanted = {b"general.architecture": None, b"general.name": None, b"general.alignment": None}
    for _ in range(kv_count):
        key = cur.string()
        value_type = cur.unpack("<I")
        value = _read_value(cur, value_type, path, key, keep=key in wanted)
        if key in wanted:
            wanted[key] = value

    alignment = wanted[b"general.alignment"]
    alignment = _DEFAULT_ALIGNMENT if alignment is None else alignment
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path} has a corrupt header (general.alignment = {alignment!r}): download or copy it again")
    return wanted, alignment


def _tensor_data_bytes(cur: _Cursor, path: Path, tensor_count: int) -> int:
    """Walk the tensor table, checking every entry: the bytes the tensor data needs (end of the last tensor)."""
    sizes = _block_sizes()
    data_bytes = 0
    for _ in range(tensor_count):
        name = cur.string().decode("utf-8", "replace")
        n_dims = cur.unpack("<I")
        if n_dims > _MAX_DIMS:
            raise GGUFError(
                f"{path} has a corrupt tensor table ({name!r} has {n_dims} dims): download or copy it again"
            )
        dims = cur.unpack(f"<{n_dims}Q") if n_dims else ()
        dims = (dims,) if isinstance(dims, int) else dims
        ggml_type, offset = cur.unpack("<IQ")
        if ggml_type not in sizes:
            raise GGUFError(
                f"{path}: tensor {name!r} has ggml type {ggml_type}, unknown to this reader: "
                f"upgrade gguf ({GGUF_PIP.replace('install', 'install -U')}) and transformers"
            )
        block, block_bytes = sizes[ggml_type]
        elements = 1
        for d in dims:
            elements *= d
        if elements % block:
            raise GGUFError(
                f"{path} has a corrupt tensor table ({name!r}: {elements} elements is not a whole number "
                f"of {block}-element blocks): download or copy it again"
            )
        data_bytes = max(data_bytes, offset + elements // block * block_bytes)
    return data_bytes


def _read_value(cur: _Cursor, value_type: int, path: Path, key: bytes, keep: bool) -> Any:
    """Read (``keep``) or skip one metadata value. Arrays are always skipped, strings in them one by one."""
    if value_type in _SCALARS:
        value = cur.unpack(_SCALARS[value_type])
        return value if keep else None
    if value_type == _STRING:
        n = cur.unpack("<Q")
        cur.need(n)
        value = bytes(cur.buf[cur.pos : cur.pos + n]).decode("utf-8", "replace") if keep else None
        cur.pos += n
        return value
    if value_type == _ARRAY:
        item_type, count = cur.unpack("<IQ")
        if item_type in _SCALARS:
            cur.skip(count * struct.calcsize(_SCALARS[item_type]))
        elif item_type == _STRING:
            cur.need(count * 8)  # each string has an 8-byte length: a cheap sanity bound before walking them
            for _ in range(count):
                cur.skip(cur.unpack("<Q"))
        elif item_type == _ARRAY:
            for _ in range(count):
                _read_value(cur, _ARRAY, path, key, keep=False)
        else:
            raise GGUFError(
                f"{path} has a corrupt header (key {key.decode('utf-8', 'replace')!r} is an array of "
                f"type {item_type}): download or copy it again"
            )
        return None
    raise GGUFError(
        f"{path} has a corrupt header (key {key.decode('utf-8', 'replace')!r} has value type "
        f"{value_type}): download or copy it again"
    )
