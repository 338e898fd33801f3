"""Data-free distillation data (LLM-QAT, Liu et al. 2023): sequences the original model writes itself.

Each sequence starts from a token drawn uniformly from the vocabulary, continues with the model's most likely
tokens for ``greedy`` steps, then samples from its full next-token distribution; seeded, so a run (and a resumed
run, which reads the cached file instead) trains on the same sequences. Nothing of the evaluation text is seen.

Example:
    >>> import tempfile, torch, transformers
    >>> cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                                num_attention_heads=2, num_key_value_heads=1)
    >>> model = transformers.LlamaForCausalLM(cfg)
    >>> folder = Path(tempfile.mkdtemp())
    >>> seqs = model_sequences(model, n=3, length=8, seed=0, cache=folder / "a.pt", batch=2)
    >>> seqs.shape, torch.equal(seqs, model_sequences(model, n=3, length=8, seed=0, cache=folder / "b.pt", batch=2))
    (torch.Size([3, 8]), True)
"""

from __future__ import annotations

from pathlib import Path

import torch

from edkm.atomic import atomic_path

GREEDY_STEPS = 3  # LLM-QAT: the first few tokens greedily, then sampling, for diverse but fluent text


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
