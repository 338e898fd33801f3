"""Text from a causal LM: greedy or sampled continuation of a prompt (what ``edkm generate`` prints)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def generate_text(model: nn.Module, tokenizer: Any, prompt: str = "", max_new_tokens: int = 80, **sampling: Any) -> str:
    """Decode a continuation of ``prompt`` (greedy unless ``do_sample=True`` with temperature/top_p)."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids if prompt else torch.tensor([[tokenizer.bos_token_id]])
    ids = ids.to(next(model.parameters()).device)
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id, **sampling)
    return tokenizer.decode(out[0], skip_special_tokens=True)
