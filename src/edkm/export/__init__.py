"""Packed export: dense b-bit indices + fp16 LUTs in safetensors, written atomically."""

from .format import load_palettized, read_header, save_palettized
from .pack import pack_bits, packed_nbytes, unpack_bits

__all__ = ["save_palettized", "load_palettized", "read_header", "pack_bits", "unpack_bits", "packed_nbytes"]
