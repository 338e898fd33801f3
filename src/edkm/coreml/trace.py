"""Traceable wrappers of a Hugging Face causal LM: int32 token ids and a 4-D additive causal mask in, logits out.

Newer transformers build masks with ops coremltools cannot convert (``aten::diff``, ``aten::new_ones``), so the
mask is an input and the positions are explicit; the output head is called on the hidden states directly.
``StatefulLM`` keeps fp16 key/value caches as buffers updated by slice assignment (Core ML states).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.cache_utils import Cache


def causal_mask(query: int, end: int) -> torch.Tensor:
    """Additive mask (1, 1, query, end): query token i (at position end - query + i) sees positions <= its own.

    >>> causal_mask(2, 3)[0, 0]
    tensor([[0., 0., -inf],
            [0., 0., 0.]])
    """
    return torch.full((query, end), float("-inf")).triu(end - query + 1)[None, None]


def _cache_keyword(base: nn.Module) -> str:
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class StatelessLM(nn.Module):
    """logits = head(base(input_ids, mask, positions 0..T-1)) for a whole sequence, no cache."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.base, self.head = lm.base_model, lm.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[-1], dtype=torch.int32)[None]
        hidden = self.base(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=False)[0]
        return self.head(hidden)


class SliceCache(Cache):
    """A transformers Cache writing new keys/values into fixed fp16 buffers at [begin, end) and reading [0, end)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, begin: int, end: int) -> None:
        super().__init__(layers=[])
        self.keys, self.values, self.begin, self.end = keys, values, begin, end

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        self.keys[layer_idx, :, :, self.begin : self.end] = key_states.to(self.keys.dtype)
        self.values[layer_idx, :, :, self.begin : self.end] = value_states.to(self.values.dtype)
        dtype = key_states.dtype
        return self.keys[layer_idx, :, :, : self.end].to(dtype), self.values[layer_idx, :, :, : self.end].to(dtype)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.end

    def __len__(self) -> int:
        return self.keys.shape[0]


class StatefulLM(StatelessLM):
    """One step of ``query`` new tokens after ``end - query`` cached ones; the caches are Core ML states."""

    def __init__(self, lm: nn.Module, max_length: int) -> None:
        super().__init__(lm)
        cfg = lm.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (cfg.num_hidden_layers, 1, heads, max_length, head_dim)
        self.register_buffer("key_cache", torch.zeros(shape, dtype=torch.float16))
        self.register_buffer("value_cache", torch.zeros(shape, dtype=torch.float16))
        self.cache_keyword = _cache_keyword(self.base)

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        end = mask.shape[-1]
        begin = end - input_ids.shape[-1]
        positions = torch.arange(begin, end, dtype=torch.int32)[None]
        cache = SliceCache(self.key_cache, self.value_cache, begin, end)
        kwargs = {self.cache_keyword: cache}
        hidden = self.base(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)[
            0
        ]
        return self.head(hidden)
