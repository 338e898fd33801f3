r"""Zero-shot tasks: the lm-eval prompt templates, the ``TASKS`` table and task loading.

Each ``Task`` says where its files live (bundled ``<name>.jsonl`` or upstream files under a
``data_dir``), how they are read (``edkm.eval.zeroshot_data``) and how an item becomes the
(context, continuation) pairs lm-eval scores, one per choice (see ``edkm.eval.zeroshot``).

Example:

>>> sorted(TASKS)[:4]
['arc_challenge', 'arc_easy', 'boolq', 'hellaswag']
>>> task_requests("arc_easy", MCDoc("Which is a gas?", ("ice", "steam"), 1))
[('Question: Which is a gas?\nAnswer:', ' ice'), ('Question: Which is a gas?\nAnswer:', ' steam')]
>>> task_requests("winogrande", MCDoc("Sarah beat Maria so _ won.", ("Sarah", "Maria"), 0))
[('Sarah beat Maria so Sarah', ' won.'), ('Sarah beat Maria so Maria', ' won.')]
>>> len(load_task("piqa", limit=3))
3
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edkm.eval.zeroshot_data import (
    ASSETS,
    MCDoc,
    _parse_arc,
    _parse_boolq,
    _parse_piqa,
    _parse_winogrande,
    read_hellaswag_llamacpp,
    read_jsonl,
    read_llm_adapters,
)


def _hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag ``preprocess``, verbatim."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _hellaswag_query(context: str) -> str:
    """lm-eval's query from llama.cpp's ``activity_label: ctx_a ctx_b`` line (see ``edkm.eval.zeroshot``)."""
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


__all__ = ["TASKS", "Task", "load_task", "task_requests"]
