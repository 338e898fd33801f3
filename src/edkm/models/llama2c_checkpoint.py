"""llama2.c checkpoints: the legacy (version-0) ``.bin`` reader and the format's constants.

A version-0 export is a little-endian header of 7 int32 (``HEADER_FIELDS``) followed by the float32 tensors listed
by ``_tensor_shapes``; ``RMS_NORM_EPS`` and ``ROPE_THETA`` are the values ``run.c`` hard-codes.

Example (the bundled ``stories260K``):

>>> from edkm.models import BUNDLED_MODEL_DIR
>>> cfg, weights = read_llama2c_checkpoint(BUNDLED_MODEL_DIR / "stories260K.bin")
>>> {k: cfg[k] for k in HEADER_FIELDS}
{'dim': 64, 'hidden_dim': 172, 'n_layers': 5, 'n_heads': 8, 'n_kv_heads': 4, 'vocab_size': 512, 'seq_len': 512}
>>> tuple(weights["wq"].shape), weights["wq"].dtype, cfg["shared_classifier"]
((5, 64, 64), torch.float32, True)
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import torch

__all__ = ["HEADER_FIELDS", "RMS_NORM_EPS", "ROPE_THETA", "read_llama2c_checkpoint"]

HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
_HEADER_BYTES = 4 * len(HEADER_FIELDS)
RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0


def _tensor_shapes(cfg: dict[str, int]) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the float32 tensors of a version-0 llama2.c file, in file order."""
    d, h, n_l = cfg["dim"], cfg["hidden_dim"], cfg["n_layers"]
    head = d // cfg["n_heads"]
    kv = cfg["n_kv_heads"] * head
    shapes = [
        ("token_embedding_table", (cfg["vocab_size"], d)),
        ("rms_att_weight", (n_l, d)),
        ("wq", (n_l, d, d)),
        ("wk", (n_l, kv, d)),
        ("wv", (n_l, kv, d)),
        ("wo", (n_l, d, d)),
        ("rms_ffn_weight", (n_l, d)),
        ("w1", (n_l, h, d)),
        ("w2", (n_l, d, h)),
        ("w3", (n_l, h, d)),
        ("rms_final_weight", (d,)),
        ("freq_cis_real", (cfg["seq_len"], head // 2)),
        ("freq_cis_imag", (cfg["seq_len"], head // 2)),
    ]
    if not cfg["shared_classifier"]:
        shapes.append(("wcls", (cfg["vocab_size"], d)))
    return shapes


def read_llama2c_checkpoint(path: str | Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """Read a legacy (version-0) llama2.c ``.bin`` checkpoint.

    The file is a little-endian header of 7 int32 (``HEADER_FIELDS``) followed by float32 tensors (see
    ``_tensor_shapes``). A positive ``vocab_size`` means the classifier is tied to the token embedding; a negative
    one means a separate ``wcls`` tensor follows.

    Returns ``(config, weights)``: ``config`` holds the header fields (``vocab_size`` made positive) plus
    ``shared_classifier`` (bool); ``weights`` maps llama2.c tensor names (``wq`` is ``[n_layers, dim, dim]``, in
    ``nn.Linear.weight`` layout, ...) to fp32 tensors.

    Raises ``FileNotFoundError`` if ``path`` is not a file and ``ValueError`` on a bad header or a file size that does
    not match it (truncated file, trailing bytes, or not a version-0 export).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c checkpoint not found: {path}")
    data = path.read_bytes()
    if len(data) < _HEADER_BYTES:
        raise ValueError(f"{path}: truncated llama2.c checkpoint ({len(data)} bytes, header needs {_HEADER_BYTES})")
    values = struct.unpack(f"<{len(HEADER_FIELDS)}i", data[:_HEADER_BYTES])
    cfg: dict[str, int] = dict(zip(HEADER_FIELDS, values))
    cfg["shared_classifier"] = cfg["vocab_size"] > 0
    cfg["vocab_size"] = abs(cfg["vocab_size"])
    if min(cfg[k] for k in HEADER_FIELDS) <= 0:
        raise ValueError(f"{path}: invalid llama2.c header {cfg} (is this a version-0 export?)")
    if cfg["dim"] % cfg["n_heads"] or cfg["n_heads"] % cfg["n_kv_heads"] or (cfg["dim"] // cfg["n_heads"]) % 2:
        raise ValueError(f"{path}: inconsistent llama2.c header {cfg}")
    shapes = _tensor_shapes(cfg)
    n_floats = sum(math.prod(shape) for _, shape in shapes)
    expected = _HEADER_BYTES + 4 * n_floats
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: size mismatch, file {what}: {len(data)} bytes, but header {cfg} implies {expected} bytes"
        )
    flat = torch.from_numpy(np.frombuffer(data, dtype="<f4", offset=_HEADER_BYTES).astype(np.float32))
    weights: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in shapes:
        n = math.prod(shape)
        weights[name] = flat[offset : offset + n].reshape(shape).clone()
        offset += n
    return cfg, weights
