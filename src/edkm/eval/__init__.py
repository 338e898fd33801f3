"""Evaluation: held-out perplexity and lm-eval-style zero-shot multiple-choice accuracy.

    from edkm.eval import perplexity, heldout_tokens, evaluate_tasks
    ppl = perplexity(model, heldout_tokens(tok, text), context=256)
    acc = evaluate_tasks(model, tok, ["piqa", "arc_easy", "arc_challenge", "winogrande", "hellaswag"])

Imports torch only; models and tokenizers are passed in.
"""

from __future__ import annotations

from edkm.eval.perplexity import eval_mode, heldout_tokens, perplexity
from edkm.eval.zeroshot import TASKS, MCDoc, evaluate_task, evaluate_tasks, load_task, loglikelihoods

__all__ = [
    "TASKS",
    "MCDoc",
    "eval_mode",
    "evaluate_task",
    "evaluate_tasks",
    "heldout_tokens",
    "load_task",
    "loglikelihoods",
    "perplexity",
]
