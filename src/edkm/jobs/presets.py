"""Architectures of common LLMs for ``edkm size`` (shapes only; no torch import here).

Numbers from each model's published ``config.json`` on the Hugging Face Hub. ``llama-7b`` / ``-13b``
/ ``-30b`` are the original LLaMA (2023-02); ``llama-2-*`` differ from them in context length
(and 70B in grouped-query attention), which does not change the weight shapes of 7B and 13B.

Example:
    >>> sorted(PRESETS)[:3]
    ['llama-13b', 'llama-2-13b', 'llama-2-70b']
    >>> human_bytes(138_240), human_bytes(13_476_839_424)
    ('135.0 KiB', '12.55 GiB')
"""

from __future__ import annotations

from typing import Any

_LLAMA = dict(model_type="llama", vocab_size=32000)
_GQA8 = dict(num_key_value_heads=8)

PRESETS: dict[str, dict[str, Any]] = {
    "llama-7b": dict(_LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama-13b": dict(_LLAMA, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "llama-30b": dict(_LLAMA, hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52),
    "llama-2-7b": dict(_LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama-2-13b": dict(
        _LLAMA, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40
    ),
    "llama-2-70b": dict(
        _LLAMA, **_GQA8, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64
    ),
    "llama-3-8b": dict(
        _GQA8,
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
    ),
    "mistral-7b": dict(
        _GQA8,
        model_type="mistral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
    ),
    "qwen2-7b": dict(
        model_type="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
    ),
}


def human_bytes(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (B, KiB, MiB, GiB, TiB)."""
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB" if abs(n) < 1024 else f"{n / 1024:.2f} TiB"


def human_count(n: float) -> str:
    """A parameter count with K / M / B (10^3, 10^6, 10^9).

    >>> human_count(260_000), human_count(6_738_415_616)
    ('260.0 K', '6.738 B')
    """
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f} {unit}" if unit == "B" else f"{n / scale:.1f} {unit}"
    return f"{n:.0f}"


__all__ = ["PRESETS", "human_bytes", "human_count"]
