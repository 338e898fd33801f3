"""Zero-shot multiple-choice accuracy (PIQA, ARC-Easy, ARC-Challenge, WinoGrande, HellaSwag, BoolQ,
OpenBookQA, Social IQa).

We implement lm-evaluation-harness's (v0.4) scoring rules rather than depend on it. lm-eval
itself can run offline here (checked with lm-eval 0.4.13 in a throwaway venv: task YAMLs with
``dataset_path: json`` over the normalized JSONL below and ``--model hf pretrained=<local dir>``
gave the same acc / acc_norm on all five bundled subsets with the bundled stories260K, and
log-likelihoods within 4e-5 of ours), but its stock tasks download from the Hugging Face Hub,
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

Example::

    from edkm.eval import evaluate_tasks
    evaluate_tasks(model, tok, ["piqa", "arc_easy"])                   # bundled 50-item subsets
    evaluate_tasks(model, tok, ["hellaswag"], data_dir=Path("/work/shared/data"), limit=1000)
    # {"hellaswag": {"acc": 0.27, "acc_norm": 0.26, "acc_bytes": 0.26, "acc_stderr": 0.014, "n": 1000}}
"""

from __future__ import annotations

import bz2
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edkm.eval.perplexity import context_length, eval_mode, model_device

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "eval"


@dataclass(frozen=True)
class MCDoc:
    """One multiple-choice item in the tasks' raw terms (before any prompt template).

    ``context``: PIQA goal, ARC question, WinoGrande sentence with ``_``, HellaSwag
    ``activity_label: ctx``. ``choices``: solutions, answers, options or endings. ``label``: gold index.
    """

    context: str
    choices: tuple[str, ...]
    label: int


# ------------------------------------------------------------------------------------- readers
def _cut(text: str, marker: str, where: str) -> tuple[str, str]:
    """Split on a marker that must occur exactly once."""
    if text.count(marker) != 1:
        raise ValueError(f"{where}: expected one {marker!r}, found {text.count(marker)}")
    head, _, tail = text.partition(marker)
    return head, tail


def _strip_affixes(text: str, prefix: str, suffix_re: str, where: str) -> tuple[str, re.Match]:
    if not text.startswith(prefix):
        raise ValueError(f"{where}: instruction does not start with {prefix!r}")
    m = re.search(suffix_re, text)
    if m is None:
        raise ValueError(f"{where}: instruction does not end with an 'Answer format' line")
    return text[len(prefix) : m.start()], m


def _answer_index(answer: str, stem: str, n: int, where: str) -> int:
    m = re.fullmatch(stem + r"(\d+)", answer.strip())
    if m is None or not 1 <= int(m.group(1)) <= n:
        raise ValueError(f"{where}: bad answer {answer!r} for {n} choices")
    return int(m.group(1)) - 1


def _parse_piqa(rec: dict, where: str) -> MCDoc:
    body, _ = _strip_affixes(
        rec["instruction"], "Please choose the correct solution to the question: ",
        r"\n\nAnswer format: solution1/solution2\s*$", where,
    )  # fmt: skip
    goal, rest = _cut(body, "\n\nSolution1: ", where)
    sol1, sol2 = _cut(rest, "\n\nSolution2: ", where)
    return MCDoc(goal, (sol1, sol2), _answer_index(rec["answer"], "solution", 2, where))


def _parse_arc(rec: dict, where: str) -> MCDoc:
    body, fmt = _strip_affixes(
        rec["instruction"], "Please choose the correct answer to the question: ",
        r"\n\nAnswer format: answer1(?:/answer\d+)*\s*$", where,
    )  # fmt: skip
    n = fmt.group(0).count("/") + 1
    question, rest = _cut(body, "\n\nAnswer1: ", where)
    choices = []
    for k in range(2, n + 1):
        choice, rest = _cut(rest, f" Answer{k}: ", where)
        choices.append(choice)
    choices.append(rest)
    return MCDoc(question, tuple(choices), _answer_index(rec["answer"], "answer", n, where))


def _parse_winogrande(rec: dict, where: str) -> MCDoc:
    body, _ = _strip_affixes(
        rec["instruction"], "Please choose the correct answer to fill in the blank to complete the given sentence: ",
        r" Answer format: option1/option2\s*$", where,
    )  # fmt: skip
    sentence, rest = _cut(body, "\n\nOption1: ", where)
    option1, option2 = _cut(rest, " Option2: ", where)
    if "_" not in sentence:
        raise ValueError(f"{where}: sentence has no blank '_'")
    return MCDoc(sentence, (option1, option2), _answer_index(rec["answer"], "option", 2, where))


def _parse_boolq(rec: dict, where: str) -> MCDoc:
    question, _ = _strip_affixes(
        rec["instruction"], "Please answer the following question with true or false, question: ",
        r"\?\n\nAnswer format: true/false\s*$", where,
    )  # fmt: skip
    if rec["answer"].strip() not in ("true", "false"):
        raise ValueError(f"{where}: bad answer {rec['answer']!r} (true/false)")
    return MCDoc(question, ("no", "yes"), int(rec["answer"].strip() == "true"))


def read_llm_adapters(path: Path, parse: Callable[[dict, str], MCDoc]) -> list[MCDoc]:
    """Read an LLM-Adapters ``test.json`` (list of ``{"instruction", "answer", ...}``)."""
    records = json.loads(Path(path).read_text(encoding="utf-8"))
    return [parse(rec, f"{path}, item {i}") for i, rec in enumerate(records)]


def read_hellaswag_llamacpp(path: Path) -> list[MCDoc]:
    """Read llama.cpp's HellaSwag text (``.txt`` or ``.txt.bz2``): 6 lines per item, namely
    ``activity_label: ctx``, the gold label 0-3, then the 4 endings."""
    opener = bz2.open if str(path).endswith(".bz2") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines is not a multiple of 6 (context, label, 4 endings)")
    docs = []
    for i in range(0, len(lines), 6):
        label = lines[i + 1].strip()
        if label not in {"0", "1", "2", "3"}:
            raise ValueError(f"{path}, item {i // 6}: bad label line {lines[i + 1]!r}")
        docs.append(MCDoc(lines[i], tuple(lines[i + 2 : i + 6]), int(label)))
    return docs


def read_jsonl(path: Path) -> list[MCDoc]:
    """Read the normalized form: one ``{"context": str, "choices": [str, ...], "label": int}`` per line."""
    docs = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            doc = MCDoc(d["context"], tuple(d["choices"]), d["label"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}, line {i + 1}: not a {{context, choices, label}} object: {e}") from None
        ok = isinstance(doc.context, str) and all(isinstance(c, str) for c in doc.choices)
        if not ok or len(doc.choices) < 2 or not isinstance(doc.label, int) or not 0 <= doc.label < len(doc.choices):
            raise ValueError(f"{path}, line {i + 1}: bad item {d}")
        docs.append(doc)
    return docs


def save_jsonl(docs: Sequence[MCDoc], path: str | Path) -> None:
    """Write docs in the normalized JSONL form that ``read_jsonl`` (and ``data_dir``) read."""
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"context": d.context, "choices": list(d.choices), "label": d.label}) + "\n")


# ------------------------------------------------------------------------------------- prompts
def _hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag ``preprocess``, verbatim."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _hellaswag_query(context: str) -> str:
    """lm-eval's query from llama.cpp's ``activity_label: ctx_a ctx_b`` line (see module docstring)."""
    label, sep, ctx = context.partition(": ")
    ends = [m.end() for m in re.finditer(r"[.!?] ", ctx)]
    head, tail = (ctx[: ends[-1]], ctx[ends[-1] :]) if ends else ("", ctx)
    if tail[:1].islower():
        tail = tail.capitalize()
    return _hellaswag_preprocess(label + sep + head + tail)


def _question_answer(doc: MCDoc) -> list[tuple[str, str]]:
    return [(f"Question: {doc.context}\nAnswer:", f" {c}") for c in doc.choices]


def _boolq(doc: MCDoc) -> list[tuple[str, str]]:
    return [(f"Question: {doc.context}?\nAnswer:", f" {c}") for c in doc.choices]


def _siqa(doc: MCDoc) -> list[tuple[str, str]]:
    return [(f"Q: {doc.context}\nA:", f" {c}") for c in doc.choices]


def _bare(doc: MCDoc) -> list[tuple[str, str]]:
    return [(doc.context, f" {c}") for c in doc.choices]


def _winogrande(doc: MCDoc) -> list[tuple[str, str]]:
    blank = doc.context.index("_")
    suffix = doc.context[blank + 1 :].strip()
    return [(doc.context[:blank] + option, f" {suffix}") for option in doc.choices]


def _hellaswag(doc: MCDoc) -> list[tuple[str, str]]:
    query = _hellaswag_query(doc.context)
    return [(query, " " + _hellaswag_preprocess(c)) for c in doc.choices]


@dataclass(frozen=True)
class Task:
    """A task as data: where its files live and how an item becomes (context, continuation) pairs."""

    name: str
    upstream: tuple[str, ...]  # paths tried under data_dir after <name>.jsonl
    read: Callable[[Path], list[MCDoc]]
    requests: Callable[[MCDoc], list[tuple[str, str]]]
    norm_texts: Callable[[MCDoc], list[str]] | None  # acc_norm length basis; None: no acc_norm


def _adapters(folder: str) -> tuple[str, ...]:
    return (f"{folder}/test.json", f"commonsense_eval/{folder}/test.json")


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("piqa", _adapters("piqa"), lambda p: read_llm_adapters(p, _parse_piqa), _question_answer,
             lambda d: list(d.choices)),
        Task("arc_easy", _adapters("ARC-Easy"), lambda p: read_llm_adapters(p, _parse_arc), _question_answer,
             lambda d: list(d.choices)),
        Task("arc_challenge", _adapters("ARC-Challenge"), lambda p: read_llm_adapters(p, _parse_arc),
             _question_answer, lambda d: list(d.choices)),
        Task("winogrande", _adapters("winogrande"), lambda p: read_llm_adapters(p, _parse_winogrande), _winogrande,
             None),
        Task("boolq", _adapters("boolq"), lambda p: read_llm_adapters(p, _parse_boolq), _boolq, None),
        Task("openbookqa", _adapters("openbookqa"), lambda p: read_llm_adapters(p, _parse_arc), _bare,
             lambda d: list(d.choices)),
        Task("social_i_qa", _adapters("social_i_qa"), lambda p: read_llm_adapters(p, _parse_arc), _siqa, None),
        Task("hellaswag", tuple(f"{d}hellaswag_val_full.txt{z}" for d in ("", "hellaswag/") for z in (".bz2", "")),
             read_hellaswag_llamacpp, _hellaswag, lambda d: [_hellaswag_preprocess(c) for c in d.choices]),
    )
}  # fmt: skip


def _get_task(task: str) -> Task:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return TASKS[task]


def load_task(task: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[MCDoc]:
    """The first ``limit`` items of a task: bundled subset if ``data_dir`` is None, else
    ``<data_dir>/<task>.jsonl`` or the upstream file under ``data_dir`` (see module docstring)."""
    spec = _get_task(task)
    if data_dir is None:
        path, reader = ASSETS / f"{task}.jsonl", read_jsonl
    else:
        root = Path(data_dir)
        tried = [root / f"{task}.jsonl", *(root / rel for rel in spec.upstream)]
        path = next((p for p in tried if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"no data for task {task!r}; tried: {', '.join(map(str, tried))}")
        reader = read_jsonl if path.suffix == ".jsonl" else spec.read
    if not path.is_file():
        raise FileNotFoundError(f"no data for task {task!r}: {path}")
    docs = reader(path)
    if limit is not None:
        docs = docs[:limit]
    if not docs:
        raise ValueError(f"task {task!r}: no items in {path}")
    return docs


def task_requests(task: str, doc: MCDoc) -> list[tuple[str, str]]:
    """The (context, continuation) pairs lm-eval scores for an item, one per choice."""
    return _get_task(task).requests(doc)


# ------------------------------------------------------------------------------------- scoring
def encode_pair(tokenizer: Any, context: str, continuation: str, add_bos: bool | None = None) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, as lm-eval's ``HFLM`` makes them (see module docstring).

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
    """``{"acc", "acc_norm", "acc_bytes", "acc_stderr", "n"}`` of one task.

    ``acc_norm`` / ``acc_bytes`` divide scores by the choice's characters / UTF-8 bytes (None for
    WinoGrande); ``acc_stderr`` is lm-eval's sample standard error of the mean (None if n == 1).
    """
    spec = _get_task(task)
    docs = load_task(task, data_dir, limit)
    per_doc = [spec.requests(d) for d in docs]
    lls = loglikelihoods(model, tokenizer, [r for reqs in per_doc for r in reqs], batch_size, add_bos)
    hits, hits_norm, hits_bytes, pos = [], [], [], 0
    for doc, reqs in zip(docs, per_doc):
        scores = lls[pos : pos + len(reqs)]
        pos += len(reqs)
        hits.append(float(_argmax(scores) == doc.label))
        if spec.norm_texts is not None:
            texts = spec.norm_texts(doc)
            hits_norm.append(float(_argmax([s / len(t) for s, t in zip(scores, texts)]) == doc.label))
            hits_bytes.append(float(_argmax([s / len(t.encode()) for s, t in zip(scores, texts)]) == doc.label))
    n = len(hits)
    acc = sum(hits) / n
    stderr = math.sqrt(sum((h - acc) ** 2 for h in hits) / (n - 1) / n) if n > 1 else None
    normed = spec.norm_texts is not None
    return {
        "acc": acc,
        "acc_norm": sum(hits_norm) / n if normed else None,
        "acc_bytes": sum(hits_bytes) / n if normed else None,
        "acc_stderr": stderr,
        "n": n,
    }


def evaluate_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    add_bos: bool | None = None,
) -> dict[str, dict[str, Any]]:
    """``{task: {"acc", "acc_norm", "acc_bytes", "acc_stderr", "n"}}`` for each task (see ``evaluate_task``)."""
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
    "task_requests",
]
