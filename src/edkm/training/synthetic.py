"""Data-free distillation data (LLM-QAT, Liu et al. 2023): sequences the original model writes itself.

Each sequence starts from a token drawn uniformly from the vocabulary, continues with the model's most likely
tokens for ``greedy`` steps, then samples from its full next-token distribution; seeded, so a run (and a resumed
run, which reads the cached file instead) trains on the same sequences. Nothing of the evaluation text is seen.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Embedding(11, 4), torch.nn.Linear(4, 11))
    >>> logits_of = lambda ids: model(ids)
    >>> seqs = sample_sequences(logits_of, vocab=11, n=3, length=6, seed=0, batch=2)
    >>> seqs.shape, torch.equal(seqs, sample_sequences(logits_of, vocab=11, n=3, length=6, seed=0, batch=2))
    (torch.Size([3, 6]), True)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from edkm.atomic import atomic_path

GREEDY_STEPS = 3  # LLM-QAT: the first few tokens greedily, then sampling, for diverse but fluent text


@torch.no_grad()
def sample_sequences(logits_of: Callable[[torch.Tensor], torch.Tensor], vocab: int, n: int, length: int, seed: int,
                     batch: int = 16, greedy: int = GREEDY_STEPS) -> torch.Tensor:  # fmt: skip
    """``n`` sequences of ``length`` tokens (int64, (n, length)); ``logits_of(ids)`` -> (B, T, vocab) logits."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        ids = torch.randint(0, vocab, (min(batch, n - start), 1), generator=gen)
        for step in range(1, length):
            logits = logits_of(ids)[:, -1, :vocab].float()
            if step <= greedy:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen)
            ids = torch.cat([ids, nxt], dim=1)
        out.append(ids)
    return torch.cat(out)


def model_sequences(
    model: torch.nn.Module, n: int, length: int, seed: int, cache: Path, batch: int = 16
) -> torch.Tensor:
    """The same recipe for a Hugging Face causal LM through its ``generate`` (KV cache), cached at ``cache``.

    Seeded by ``torch.manual_seed(seed)`` (``generate`` samples from the global generator): the same machine and
    versions give the same sequences; a resumed run reads ``cache``.
    """
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    model.eval()
    torch.manual_seed(seed)
    out = []
    with torch.no_grad():
        for start in range(0, n, batch):
            ids = torch.randint(0, model.config.vocab_size, (min(batch, n - start), 1))
            ids = model.generate(ids, max_new_tokens=GREEDY_STEPS, min_new_tokens=GREEDY_STEPS, do_sample=False)
            left = length - ids.shape[1]
            ids = model.generate(ids, max_new_tokens=left, min_new_tokens=left, do_sample=True, top_k=0, top_p=1.0,
                                 temperature=1.0)  # fmt: skip
            out.append(ids[:, :length].cpu())
    seqs = torch.cat(out)
    with atomic_path(cache) as tmp:
        torch.save(seqs, tmp)
    return seqs
