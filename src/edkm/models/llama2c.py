"""llama2.c checkpoints: reader, Hugging Face converter and plain-PyTorch reference.

The bundled model ``stories260K`` (Karpathy's tinyllamas, MIT) ships as a legacy (version-0) llama2.c export
``stories260K.bin`` plus the llama2.c tokenizer export ``tok512.bin``. This module

* reads both files (:func:`read_llama2c_checkpoint`, :class:`Llama2cTokenizer`),
* converts them into a standard Hugging Face ``LlamaForCausalLM`` checkpoint with a fast tokenizer
  (:func:`llama2c_to_hf`), and
* provides an independent, plain-PyTorch port of the llama2.c ``run.c`` forward pass
  (:func:`llama2c_forward`) and tokenizer, used by the tests as the reference for the converted checkpoint.

The code is split by concern, and every name is re-exported here: :mod:`edkm.models.llama2c_checkpoint` (reader,
format constants), :mod:`edkm.models.llama2c_reference` (``run.c`` forward pass), :mod:`edkm.models.llama2c_tokenizer`
(``run.c`` tokenizer) and :mod:`edkm.models.llama2c_hf` (Hugging Face tokenizer and checkpoint conversion).
``transformers`` and ``tokenizers`` are imported lazily, inside the functions that need them.

Example (greedy next token of the bundled model, through the reference path only):

>>> import torch
>>> from edkm.models import BUNDLED_MODEL_DIR
>>> cfg, weights = read_llama2c_checkpoint(BUNDLED_MODEL_DIR / "stories260K.bin")
>>> tok = Llama2cTokenizer(BUNDLED_MODEL_DIR / "tok512.bin")
>>> ids = tok.encode("Once upon a time")
>>> logits = llama2c_forward(cfg, weights, torch.tensor([ids]))
>>> tok.decode(ids + [int(logits[0, -1].argmax())])
'Once upon a time,'
"""

from __future__ import annotations

from edkm.models.llama2c_checkpoint import HEADER_FIELDS, read_llama2c_checkpoint
from edkm.models.llama2c_checkpoint import RMS_NORM_EPS as RMS_NORM_EPS
from edkm.models.llama2c_checkpoint import ROPE_THETA as ROPE_THETA
from edkm.models.llama2c_hf import build_hf_tokenizer, llama2c_to_hf, permute_rotary
from edkm.models.llama2c_reference import llama2c_forward, rope_tables
from edkm.models.llama2c_tokenizer import BOS_ID as BOS_ID
from edkm.models.llama2c_tokenizer import EOS_ID as EOS_ID
from edkm.models.llama2c_tokenizer import SPECIAL_TOKENS as SPECIAL_TOKENS
from edkm.models.llama2c_tokenizer import UNK_ID as UNK_ID
from edkm.models.llama2c_tokenizer import Llama2cTokenizer

__all__ = [
    "HEADER_FIELDS",
    "read_llama2c_checkpoint",
    "llama2c_forward",
    "Llama2cTokenizer",
    "build_hf_tokenizer",
    "llama2c_to_hf",
    "permute_rotary",
    "rope_tables",
]
