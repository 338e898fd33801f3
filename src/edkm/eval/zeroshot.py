"""Zero-shot multiple-choice accuracy (PIQA, ARC-Easy, ARC-Challenge, WinoGrande, HellaSwag, BoolQ,
OpenBookQA, Social IQa).

We implement lm-evaluation-harness's (v0.4) scoring rules rather than depend on it. lm-eval
itself runs offline here and agrees with us (``edkm.eval.lmeval_check``: task YAMLs with
``dataset_path: json`` over the normalized JSONL below, its ``HFLM`` on the same in-memory model:
the same acc / acc_norm on the five field tasks, for the bundled model in the tests and for
SmolLM2-135M, log-likelihoods within 4e-5 of ours), but its stock tasks download from the Hugging Face Hub,
our copies need converting anyway (LLM-Adapters instruction strings, llama.cpp's HellaSwag
text), it pulls in ~50 packages (``datasets``, ``accelerate``, pandas, scikit-learn, ...), and we
want to score in-memory (palettized) models inside tests. The rules reproduced, per lm-eval's
task YAMLs and ``HFLM``:

* prompts: PIQA ``"Question: {goal}\\nAnswer:"`` + ``" {sol}"``; ARC ``"Question: {question}\\nAnswer:"``
  + ``" {choice}"``; HellaSwag ``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``
  + ``" " + preprocess(ending)``; WinoGrande partial scoring: context ``sentence[:blank] + option``,
  continuation ``" " + sentence[blank + 1:].strip()`` (the shared suffix), scored per option;
  OpenBookQA ``question_stem`` + ``" {choice}"`` (acc, acc_norm); Social IQa ``"Q: {context} {question}\nA:"``
  + ``" {answer}"`` (acc only; LLM-Adapters joins context and question with one space, as lm-eval's
  template does); BoolQ ``"{passage}\nQuestion: {question}?\nAnswer:"`` + ``" no"`` / ``" yes"`` (acc
  only) **without the passage**: the shipped LLM-Adapters copy has none, so our BoolQ is the
  closed-book variant ``"Question: {question}?\nAnswer:"`` and not comparable with published BoolQ.
* a choice's score is the summed log-probability of its continuation tokens, which are the tokens
  of ``tok.encode(context + continuation)`` past the ``len(tok.encode(context))`` context tokens
  (trailing spaces of the context move to the continuation first; the tokenizer's default
  special tokens, i.e. BOS for Llama, as ``HFLM`` with ``add_bos_token=None``); inputs longer
  than the model's context are truncated from the left.
* ``acc`` = argmax score == gold; ``acc_norm`` = argmax score / ``len(choice)``, in characters of
  the choice text without the leading space (lm-eval's ``acc_norm``); ``acc_bytes`` = the same in
  UTF-8 bytes (lm-eval's ``acc_bytes``; differs for the ~1-2 % of choices with non-ASCII text).
  lm-eval reports only ``acc`` for WinoGrande (both options score the same continuation), BoolQ and
  Social IQa, so ``acc_norm`` and ``acc_bytes`` are ``None`` there.

Data. ``data_dir=None`` reads the 50-item subsets bundled in ``edkm/assets/eval/<task>.jsonl``
(one ``{"context", "choices", "label"}`` object per line, see ``MCDoc``). ``data_dir=<dir>`` reads
``<dir>/<task>.jsonl`` if present, else the full upstream files under it, e.g.
``data_dir=Path("/work/shared/data")`` finds ``commonsense_eval/piqa/test.json`` (LLM-Adapters
form) and ``hellaswag/hellaswag_val_full.txt.bz2`` (llama.cpp form). HellaSwag caveat: the
llama.cpp file keeps ``ctx`` (``ctx_a + " " + ctx_b``) without lm-eval's ``ctx_b.capitalize()``;
we recover it by capitalizing the text after the last sentence end when it starts lower-case
(ActivityNet's ``ctx_b`` fragment), so a few prompts may differ from lm-eval's in case.

The code is split by concern: ``edkm.eval.zeroshot_data`` (``MCDoc``, file readers),
``edkm.eval.zeroshot_tasks`` (prompt templates, ``TASKS``, ``load_task``) and
``edkm.eval.zeroshot_scoring`` (``encode_pair``, ``loglikelihoods``); every name is re-exported here.

Example::

    from edkm.eval import evaluate_tasks
    evaluate_tasks(model, tok, ["piqa", "arc_easy"])                   # bundled 50-item subsets
    evaluate_tasks(model, tok, ["hellaswag"], data_dir=Path("/work/shared/data"), limit=1000)
    # {"hellaswag": {"acc": 0.27, "acc_norm": 0.26, "acc_bytes": 0.26, "acc_stderr": 0.014, "n": 1000}}

Runnable, with a toy tokenizer and a model that gives every token log-probability ``-log(128)``
(so the choice with the fewest tokens wins):

>>> import types
>>> class Chars:  # one id per character, BOS = 0
...     bos_token_id, eos_token_id = 0, None
...     def encode(self, text, add_special_tokens=True):
...         return [0] * add_special_tokens + [ord(c) % 128 for c in text]
>>> class Uniform(torch.nn.Module):
...     def forward(self, x):
...         return types.SimpleNamespace(logits=torch.zeros(*x.shape, 128))
>>> evaluate_tasks(Uniform(), Chars(), ["arc_easy", "boolq"], limit=10)["boolq"]["acc_norm"] is None
True
>>> r = evaluate_task(Uniform(), Chars(), "arc_easy", limit=10)
>>> r["acc"], r["acc_norm"], r["n"], round(r["acc_stderr"], 4)
(0.3, 0.1, 10, 0.1528)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from edkm.eval.zeroshot_data import ASSETS as ASSETS
from edkm.eval.zeroshot_data import MCDoc, read_hellaswag_llamacpp, read_jsonl, read_llm_adapters, save_jsonl
from edkm.eval.zeroshot_scoring import encode_pair, loglikelihoods
from edkm.eval.zeroshot_tasks import TASKS, Task, _get_task, load_task, task_requests


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda j: values[j])  # first maximum, like np.argmax


def evaluate_task(
    model: torch.nn.Module,
    tokenizer: Any,
    task: str,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    add_bos: bool | None = None,
) -> dict[str, Any]:
    """``{"acc", "acc_norm", "acc_bytes", "acc_stderr", "acc_norm_stderr", "n"}`` of one task.

    ``acc_norm`` / ``acc_bytes`` divide scores by the choice's characters / UTF-8 bytes (None for
    WinoGrande); ``acc_stderr`` / ``acc_norm_stderr`` are lm-eval's sample standard errors of the mean (None if
    n == 1).
    """
    docs = load_task(task, data_dir, limit)
    requests = [r for d in docs for r in task_requests(task, d)]
    return task_metrics(task, docs, loglikelihoods(model, tokenizer, requests, batch_size, add_bos))


def task_metrics(task: str, docs: Sequence[MCDoc], lls: Sequence[float]) -> dict[str, Any]:
    """:func:`evaluate_task`'s result from the log-likelihoods of every (item, choice) request, in order."""
    spec = _get_task(task)
    hits, hits_norm, hits_bytes, pos = [], [], [], 0
    for doc in docs:  # one request per choice (every task's template)
        scores = lls[pos : pos + len(doc.choices)]
        pos += len(doc.choices)
        hits.append(float(_argmax(scores) == doc.label))
        if spec.norm_texts is not None:
            texts = spec.norm_texts(doc)
            hits_norm.append(float(_argmax([s / len(t) for s, t in zip(scores, texts)]) == doc.label))
            hits_bytes.append(float(_argmax([s / len(t.encode()) for s, t in zip(scores, texts)]) == doc.label))
    n, normed = len(hits), spec.norm_texts is not None
    return {
        "acc": sum(hits) / n,
        "acc_norm": sum(hits_norm) / n if normed else None,
        "acc_bytes": sum(hits_bytes) / n if normed else None,
        "acc_stderr": _stderr(hits),
        "acc_norm_stderr": _stderr(hits_norm) if normed else None,
        "n": n,
    }


def _stderr(hits: list[float]) -> float | None:
    """lm-eval's sample standard error of the mean (None if fewer than 2)."""
    n = len(hits)
    if n < 2:
        return None
    mean = sum(hits) / n
    return math.sqrt(sum((h - mean) ** 2 for h in hits) / (n - 1) / n)


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    add_bos: bool | None = None,
) -> dict[str, dict[str, Any]]:
    """``{task: {"acc", "acc_norm", "acc_bytes", "acc_stderr", "acc_norm_stderr", "n"}}`` (``evaluate_task``)."""
    for t in tasks:
        _get_task(t)
    return {t: evaluate_task(model, tokenizer, t, data_dir, limit, batch_size, add_bos) for t in tasks}


__all__ = [
    "TASKS",
    "MCDoc",
    "Task",
    "encode_pair",
    "evaluate_task",
    "evaluate_tasks",
    "load_task",
    "loglikelihoods",
    "read_hellaswag_llamacpp",
    "read_jsonl",
    "read_llm_adapters",
    "save_jsonl",
    "task_metrics",
    "task_requests",
]
