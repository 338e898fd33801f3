r"""Zero-shot data: the ``MCDoc`` item and the readers / writer of the task files.

Three on-disk forms become lists of ``MCDoc``: the normalized JSONL that is bundled in ``ASSETS``
(:func:`read_jsonl`, written by :func:`save_jsonl`), LLM-Adapters ``test.json`` files
(:func:`read_llm_adapters` with one of the ``_parse_*`` instruction parsers) and llama.cpp's
HellaSwag text (:func:`read_hellaswag_llamacpp`). Prompt templates live in
``edkm.eval.zeroshot_tasks``; the rules are described in ``edkm.eval.zeroshot``.

Example:

>>> import tempfile
>>> docs = read_jsonl(ASSETS / "arc_easy.jsonl")
>>> len(docs), len(docs[0].choices) >= 2
(50, True)
>>> with tempfile.TemporaryDirectory() as tmp:
...     save_jsonl(docs, Path(tmp) / "arc_easy.jsonl")
...     read_jsonl(Path(tmp) / "arc_easy.jsonl") == docs
True
>>> _parse_boolq({"instruction": "Please answer the following question with true or false, question: "
...               "is the sky blue?\n\nAnswer format: true/false", "answer": "true"}, "example")
MCDoc(context='is the sky blue', choices=('no', 'yes'), label=1)
"""

from __future__ import annotations

import bz2
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

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


__all__ = [
    "ASSETS",
    "MCDoc",
    "read_hellaswag_llamacpp",
    "read_jsonl",
    "read_llm_adapters",
    "save_jsonl",
]
