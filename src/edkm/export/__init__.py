"""The packed single-file format: dense b-bit indices + fp16 LUTs in safetensors, validated on load.

The Hugging Face folder and loading into a new Hugging Face model live in :mod:`edkm.hf`.
"""

from edkm.export.errors import FormatError
from edkm.export.files import is_edkm_folder
from edkm.export.format import inspect_file, load_into, read_header, save_palettized
from edkm.export.pack import pack_bits, packed_nbytes, unpack_bits

__all__ = [
    "FormatError",
    "inspect_file",
    "is_edkm_folder",
    "load_into",
    "pack_bits",
    "packed_nbytes",
    "read_header",
    "save_palettized",
    "unpack_bits",
]
