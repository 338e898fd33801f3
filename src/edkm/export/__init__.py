"""Packed export: dense b-bit indices + fp16 LUTs in safetensors (single file or Hugging Face folder), validated on load."""

from .errors import FormatError
from .folder import is_edkm_folder, load_folder, save_folder, write_model_card
from .format import inspect_file, load_palettized, read_header, save_palettized
from .pack import pack_bits, packed_nbytes, unpack_bits

__all__ = ["save_palettized", "load_palettized", "read_header", "inspect_file", "FormatError", "save_folder",
           "load_folder", "is_edkm_folder", "write_model_card", "pack_bits", "unpack_bits", "packed_nbytes"]
