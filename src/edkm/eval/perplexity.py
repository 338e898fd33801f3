"""Perplexity of a causal LM on a token stream, every token (but the first) predicted exactly once.

The stream is cut into non-overlapping windows of ``context + 1`` tokens that advance by
``context`` (window ``k`` holds tokens ``k*context .. (k+1)*context``): the model reads the first
``context`` tokens of a window and predicts tokens ``1 .. context`` of it, so consecutive windows
share one token and each token after the first is a target once. A final shorter window covers
the rest. Token-level NLL is summed in float64 and ``exp(mean NLL)`` is returned. This is the
non-overlapping (stride == context) evaluation of the HF perplexity guide; a sliding window with
more context per token gives lower numbers, so compare only numbers computed the same way.

Example::

    from edkm.data.text import load_text, split_text, tokenize_text
    from edkm.eval import perplexity
    _, heldout = split_text(load_text("tinystories_val.txt"))
    ppl = perplexity(model, tokenize_text(tok, heldout), context=256)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from edkm.data.text import split_text, tokenize_text


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put every module of ``model`` in eval mode and restore each one's train/eval flag after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU if it has none)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def context_length(model: Any) -> int | None:
    """The model's context length from ``model.config`` (None if unknown)."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def token_nll(model: torch.nn.Module, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood ``[batch, seq]`` of ``targets`` given ``input_ids``
    (log-softmax in at least float32).

    ``targets[b, t]`` is scored against the logits at position ``t``; ``-100`` targets get 0.
    """
    logits = model(input_ids).logits
    logp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    safe = targets.clamp_min(0)
    nll = -logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return nll.masked_fill(targets < 0, 0.0)


def perplexity(
    model: torch.nn.Module, tokens: torch.Tensor, context: int = 256, batch_size: int = 8, batch_tokens: int = 4096
) -> float:
    """exp(mean NLL) of every token of a 1-D stream but the first (see the module docstring).

    Windows go through the model ``batch_size`` at a time, fewer where that would pass ``batch_tokens`` tokens:
    the logits of a batch are batch x context x vocabulary floats (8 windows of 2048 tokens of SmolLM2's 49,152-token
    vocabulary: 3.2 GB, twice with the log-softmax).

    Runs under ``torch.inference_mode`` with the model in eval mode, restoring each module's
    train/eval flag afterwards. ``context`` must fit the model's ``max_position_embeddings``.

    Example:
        >>> import torch
        >>> class Uniform(torch.nn.Module):  # equal logits over 7 tokens
        ...     def forward(self, ids):
        ...         return type("Out", (), {"logits": torch.zeros(*ids.shape, 7)})
        >>> round(perplexity(Uniform(), torch.arange(50) % 7, context=16), 6)
        7.0
    """
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D stream, got shape {tuple(tokens.shape)}")
    if tokens.numel() < 2:
        raise ValueError(f"need at least 2 tokens to predict one, got {tokens.numel()}")
    if context < 1 or batch_size < 1:
        raise ValueError(f"context and batch_size must be positive, got {context}, {batch_size}")
    limit = context_length(model)
    if limit is not None and context > limit:
        raise ValueError(f"context={context} exceeds the model's context of {limit} tokens (max_position_embeddings)")
    tokens = tokens.long().to(model_device(model))
    n_pred = tokens.numel() - 1
    n_full = n_pred // context
    total = torch.zeros((), dtype=torch.float64, device=tokens.device)
    with eval_mode(model), torch.inference_mode():
        if n_full:
            windows = tokens[: n_full * context + 1].unfold(0, context + 1, context)  # [n_full, context + 1]
            for batch in windows.split(max(1, min(batch_size, batch_tokens // context))):
                total += token_nll(model, batch[:, :-1], batch[:, 1:]).double().sum()
        if n_pred > n_full * context:
            tail = tokens[n_full * context :].unsqueeze(0)
            total += token_nll(model, tail[:, :-1], tail[:, 1:]).double().sum()
    return math.exp(total.item() / n_pred)


def heldout_tokens(tokenizer: Any, text: str, holdout: float = 0.2) -> torch.Tensor:
    """Token stream of the held-out part of ``text`` (its last ``holdout`` by characters, see
    ``edkm.data.text.split_text``), tokenized by ``edkm.data.text.tokenize_text`` (BOS before each document)."""
    return tokenize_text(tokenizer, split_text(text, holdout)[1])


__all__ = ["perplexity", "heldout_tokens", "eval_mode", "token_nll", "context_length", "model_device"]
