"""Zero-shot scoring: lm-eval ``HFLM``-style tokenization and summed continuation log-likelihoods.

:func:`encode_pair` splits ``tok.encode(context + continuation)`` into context and continuation ids
(trailing context spaces move to the continuation); :func:`loglikelihoods` sums, in float64, the
log-probabilities of each continuation's tokens, batched longest first (see ``edkm.eval.zeroshot``).

Example, with a toy one-id-per-character tokenizer and a model that predicts a uniform distribution:

>>> import math, types
>>> class Chars:
...     bos_token_id, eos_token_id = 0, None
...     def encode(self, text, add_special_tokens=True):
...         return [0] * add_special_tokens + [ord(c) for c in text]
>>> encode_pair(Chars(), "Q: ", "yes")
([0, 81, 58], [32, 121, 101, 115])
>>> class Uniform(torch.nn.Module):
...     def forward(self, x):
...         return types.SimpleNamespace(logits=torch.zeros(*x.shape, 128))
>>> scores = loglikelihoods(Uniform(), Chars(), [("Q:", " yes"), ("Q:", " no")])
>>> [round(s / -math.log(128), 6) for s in scores]
[4.0, 3.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from edkm.eval.perplexity import context_length, eval_mode, model_device


def encode_pair(
    tokenizer: Any, context: str, continuation: str, add_bos: bool | None = None
) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, as lm-eval's ``HFLM`` makes them (see ``edkm.eval.zeroshot``).

    ``add_bos=None`` uses the tokenizer's default special tokens; True / False force them on / off.
    An empty context becomes ``[BOS]`` (EOS if no BOS) and the continuation is encoded alone.
    """
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise ValueError("an empty context needs a BOS or EOS token to condition on")
        return (cont[:1], cont[1:]) if cont and cont[0] == prefix else ([prefix], cont)
    kwargs = {} if add_bos is None else {"add_special_tokens": add_bos}
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, **kwargs)
    ctx = tokenizer.encode(context, **kwargs)
    return list(ctx), list(whole[len(ctx) :])


def loglikelihoods(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    add_bos: bool | None = None,
) -> list[float]:
    """Summed log-probability of each continuation given its context (float64 sums).

    Requests are batched longest first, right-padded (a causal model's logits at real positions
    do not depend on later padding), under ``torch.inference_mode`` with the model in eval mode.
    """
    encoded = [encode_pair(tokenizer, c, x, add_bos) for c, x in requests]
    limit = context_length(model)
    for (c, x), (_, cont) in zip(requests, encoded):
        if not cont:
            raise ValueError(f"continuation {x!r} (context {c[-40:]!r}) encodes to no tokens")
        if limit is not None and len(cont) > limit:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds the model's context of {limit}")
    rows = []
    for ctx, cont in encoded:
        full = ctx + cont
        if limit is not None:
            full = full[-(limit + 1) :]
        rows.append((full[:-1], cont))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    device = model_device(model)
    out = [0.0] * len(rows)
    with eval_mode(model), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = len(rows[idx[0]][0])
            x = torch.zeros(len(idx), width, dtype=torch.long)
            for b, i in enumerate(idx):
                x[b, : len(rows[i][0])] = torch.tensor(rows[i][0])
            logits = model(x.to(device)).logits
            for b, i in enumerate(idx):
                inp, cont = rows[i]
                n = len(inp)
                picked = logits[b, n - len(cont) : n]
                logp = torch.log_softmax(picked.to(torch.promote_types(picked.dtype, torch.float32)), dim=-1)
                target = torch.tensor(cont, device=logp.device).unsqueeze(-1)
                out[i] = logp.gather(-1, target).double().sum().item()
    return out


__all__ = ["encode_pair", "loglikelihoods"]
