"""Plain-PyTorch port of the llama2.c ``run.c`` forward pass, the reference for the converted checkpoint.

Written independently of Hugging Face: RoPE on interleaved pairs (:func:`rope_tables`), RMSNorm and the
batched, causally masked :func:`llama2c_forward` over the weights that ``read_llama2c_checkpoint`` returns.

Example:

>>> cos, sin = rope_tables(head_size=8, seq_len=3)
>>> tuple(cos.shape), cos[0].tolist(), sin[0].tolist()
((3, 4), [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0])
>>> from edkm.models import BUNDLED_MODEL_DIR
>>> from edkm.models.llama2c_checkpoint import read_llama2c_checkpoint
>>> cfg, weights = read_llama2c_checkpoint(BUNDLED_MODEL_DIR / "stories260K.bin")
>>> tuple(llama2c_forward(cfg, weights, torch.tensor([[1, 403, 407]])).shape)
(1, 3, 512)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from edkm.models.llama2c_checkpoint import RMS_NORM_EPS, ROPE_THETA

__all__ = ["llama2c_forward", "rope_tables"]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """run.c ``rmsnorm``: ``x / sqrt(mean(x^2) + 1e-5) * weight``."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_NORM_EPS) * weight


def _rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(x[2i], x[2i+1])`` of the last dim; ``x`` is ``[B, T, heads, head_size]``."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def rope_tables(head_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of shape ``[seq_len, head_size // 2]``; pair ``i`` rotates at ``10000^(-2i/head_size)``."""
    freqs = ROPE_THETA ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * freqs[None, :]
    return angles.cos().float(), angles.sin().float()


@torch.no_grad()
def llama2c_forward(config: dict[str, int], weights: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
    """Reference llama2.c forward pass: ``tokens`` ``LongTensor[B, T]`` (positions 0..T-1) -> logits ``[B, T, V]``.

    A direct transcription of ``run.c`` ``forward()`` batched over positions with a causal mask: pre-norm RMSNorm
    (eps 1e-5), RoPE on interleaved pairs, grouped-query attention (query head ``h`` uses K/V head
    ``h // (n_heads // n_kv_heads)``) scaled by ``1/sqrt(head_size)``, SwiGLU FFN ``w2(silu(w1 x) * w3 x)``, final
    RMSNorm and the (tied) classifier. Computed in the dtype of ``weights``; written independently of Hugging Face.
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
    b, t = tokens.shape
    if t > config["seq_len"]:
        raise ValueError(f"sequence length {t} exceeds the model's seq_len {config['seq_len']}")
    n_heads, n_kv = config["n_heads"], config["n_kv_heads"]
    head = config["dim"] // n_heads
    cos, sin = rope_tables(head, t)
    w = weights
    cos, sin = cos.to(w["wq"].dtype), sin.to(w["wq"].dtype)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    x = w["token_embedding_table"][tokens]
    for layer in range(config["n_layers"]):
        xb = _rms_norm(x, w["rms_att_weight"][layer])
        q = (xb @ w["wq"][layer].T).view(b, t, n_heads, head)
        k = (xb @ w["wk"][layer].T).view(b, t, n_kv, head)
        v = (xb @ w["wv"][layer].T).view(b, t, n_kv, head)
        q, k = _rope_interleaved(q, cos, sin), _rope_interleaved(k, cos, sin)
        q = q.transpose(1, 2) / math.sqrt(head)  # [B, H, T, hs]
        k = k.repeat_interleave(n_heads // n_kv, dim=2).transpose(1, 2)
        v = v.repeat_interleave(n_heads // n_kv, dim=2).transpose(1, 2)
        att = (q @ k.transpose(-1, -2)).masked_fill_(~causal, float("-inf")).softmax(dim=-1)
        out = (att @ v).transpose(1, 2).reshape(b, t, n_heads * head)
        x = x + out @ w["wo"][layer].T
        xb = _rms_norm(x, w["rms_ffn_weight"][layer])
        x = x + (F.silu(xb @ w["w1"][layer].T) * (xb @ w["w3"][layer].T)) @ w["w2"][layer].T
    x = _rms_norm(x, w["rms_final_weight"])
    classifier = w["token_embedding_table"] if config["shared_classifier"] else w["wcls"]
    return x @ classifier.T
