"""Training and evaluation data: plain text and Alpaca instructions, tokenized and packed.

Two sources, one output format (HF causal-LM convention: ``labels`` equal ``input_ids`` with
``-100`` on positions that carry no loss; the model shifts them by one internally)::

    text = load_text("tinystories_val.txt")
    train_text, heldout_text = split_text(text, holdout=0.2)     # last 20 % by characters
    train = PackedDataset.from_tokens(tokenize_text(tok, train_text), seq_len=256)

    records = load_alpaca("alpaca_200.json")
    train_recs, heldout_recs = split_records(records, holdout=0.1)
    train = PackedDataset.from_examples(tokenize_alpaca(tok, train_recs), seq_len=256)

    check_seq_len(256, model.config)   # ValueError beyond max_position_embeddings

``tok`` is any Hugging Face tokenizer (``tok.encode``, ``tok.bos_token_id``, ``tok.eos_token_id``);
nothing here imports transformers. Everything is deterministic: no shuffling happens here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

IGNORE_INDEX = -100
"""Label value that the Hugging Face / PyTorch cross-entropy ignores."""

# Stanford Alpaca's templates (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), verbatim. The
# response follows "### Response:" directly; Alpaca's training appends the EOS token after it.
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)

_BLANK_LINE = re.compile(r"\n[ \t\r]*\n")


# --------------------------------------------------------------------------------------- loading
def _read_nonempty(path: Path, kind: str) -> str:
    """UTF-8 text of ``path``; FileNotFoundError / ValueError naming ``kind`` and the path if it is missing or blank."""
    if not path.is_file():
        raise FileNotFoundError(f"{kind} not found: {path}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{kind} is empty: {path}")
    return text


def load_text(path: str | Path) -> str:
    """Read a UTF-8 text file (universal newlines: ``\\r\\n`` becomes ``\\n``).

    Raises FileNotFoundError naming the path, ValueError if the file holds no text.

    Example:
        >>> import tempfile, os
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = os.path.join(d, "t.txt")
        ...     _ = open(p, "w").write("Once upon a time.\\r\\n\\r\\nThe end.\\r\\n")
        ...     load_text(p)
        'Once upon a time.\\n\\nThe end.\\n'
    """
    return _read_nonempty(Path(path), "text file")


def load_alpaca(path: str | Path) -> list[dict[str, str]]:
    """Read an Alpaca-style JSON file: a list of ``{"instruction", "input" (optional), "output"}``.

    Returns records with exactly those three string keys (a missing ``input`` becomes ``""``;
    other keys are dropped). Raises FileNotFoundError naming a missing file and ValueError for an
    empty file, malformed JSON, a top level that is not a non-empty list, and a record (named by
    its index) that is not an object, lacks ``instruction`` or ``output``, has a non-string field,
    an empty instruction, or an empty output (a prompt-only record gives nothing to train on).

    Example:
        >>> import json, tempfile, os
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = os.path.join(d, "a.json")
        ...     _ = open(p, "w").write(json.dumps([{"instruction": "Say hi.", "output": "Hi!"}]))
        ...     load_alpaca(p)
        [{'instruction': 'Say hi.', 'input': '', 'output': 'Hi!'}]
    """
    path = Path(path)
    raw = _read_nonempty(path, "Alpaca file")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"Alpaca file {path} is not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise ValueError(f"Alpaca file {path}: expected a JSON list of records, got {type(data).__name__}")
    if not data:
        raise ValueError(f"Alpaca file {path} holds no records")
    records = []
    for i, rec in enumerate(data):
        where = f"Alpaca file {path}, record {i}"
        if not isinstance(rec, dict):
            raise ValueError(f"{where}: expected an object, got {type(rec).__name__}")
        for key in ("instruction", "output"):
            if key not in rec:
                raise ValueError(f"{where}: missing key {key!r}")
        out = {"instruction": rec["instruction"], "input": rec.get("input", ""), "output": rec["output"]}
        for key, value in out.items():
            if not isinstance(value, str):
                raise ValueError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
        if not out["instruction"].strip():
            raise ValueError(f"{where}: empty 'instruction'")
        if not out["output"].strip():
            raise ValueError(f"{where}: empty 'output' (a prompt-only record has nothing to train on)")
        records.append(out)
    return records


# ------------------------------------------------------------------------------------- splitting
def split_text(text: str, holdout: float = 0.2) -> tuple[str, str]:
    """Split ``text`` into (train, held-out): the held-out part is the last ``holdout`` by characters.

    The cut point ``len(text) - round(holdout * len(text))`` is moved back to the start of the
    nearest preceding document (the character after a blank line), or, if there is none, after the
    nearest preceding whitespace, so no document or word is cut in two. The held-out part is thus
    at least ``holdout`` of the characters (for TinyStories, by at most one paragraph), and
    ``train + heldout == text``. Raises ValueError if either side would be empty.

    Example:
        >>> split_text("aaaa bbbb\\n\\ncccc dddd\\n\\neeee eeee", holdout=0.2)
        ('aaaa bbbb\\n\\ncccc dddd\\n\\n', 'eeee eeee')
        >>> split_text("aaaa bbbb cccc dddd eeee", holdout=0.3)
        ('aaaa bbbb cccc ', 'dddd eeee')
    """
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    target = len(text) - round(holdout * len(text))
    ends = [m.end() for m in _BLANK_LINE.finditer(text[:target])]
    cut = ends[-1] if ends else 0
    if cut == 0:
        ws = [m.end() for m in re.finditer(r"\s+", text[:target])]
        cut = ws[-1] if ws else target
    train, heldout = text[:cut], text[cut:]
    if not train.strip() or not heldout.strip():
        raise ValueError(f"holdout={holdout} leaves an empty side when splitting {len(text)} characters")
    return train, heldout


def split_records(records: Sequence[Any], holdout: float = 0.1) -> tuple[list[Any], list[Any]]:
    """Split records into (train, held-out): the held-out part is the last ``holdout`` fraction.

    ``round(holdout * n)`` records are held out, at least one and at most ``n - 1``.

    Example:
        >>> split_records(list(range(10)), holdout=0.2)
        ([0, 1, 2, 3, 4, 5, 6, 7], [8, 9])
    """
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    n = len(records)
    if n < 2:
        raise ValueError(f"need at least 2 records to hold some out, got {n}")
    n_held = min(max(1, round(holdout * n)), n - 1)
    return list(records[: n - n_held]), list(records[n - n_held :])


# ------------------------------------------------------------------------------------ tokenizing
def split_documents(text: str) -> list[str]:
    """Split text into documents on blank lines (stripped, empty ones dropped).

    TinyStories marks no story boundaries (paragraphs inside a story are also separated by a blank
    line), so its "documents" are paragraphs.

    Example:
        >>> split_documents("One.\\nTwo.\\n\\n\\nThree.\\n  \\n")
        ['One.\\nTwo.', 'Three.']
    """
    return [d.strip() for d in _BLANK_LINE.split(text) if d.strip()]


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize text into one 1-D LongTensor: each document (see ``split_documents``) is encoded
    without special tokens and preceded by BOS (as the tokenizer's default add-BOS and llama2.c's
    pretokenizer do), then all are concatenated. No BOS if the tokenizer has none.
    """
    docs = split_documents(text)
    if not docs:
        raise ValueError("no text to tokenize")
    bos = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    stream = [t for ids in encoded for t in (*bos, *ids)]
    return torch.tensor(stream, dtype=torch.long)


def format_alpaca_prompt(record: Mapping[str, str]) -> str:
    """The Stanford Alpaca prompt for a record (the with-input template if ``input`` is non-empty).

    Example:
        >>> print(format_alpaca_prompt({"instruction": "Add 2 and 3.", "input": ""}))
        Below is an instruction that describes a task. Write a response that appropriately completes the request.
        <BLANKLINE>
        ### Instruction:
        Add 2 and 3.
        <BLANKLINE>
        ### Response:
    """
    if record.get("input", ""):
        return ALPACA_PROMPT_INPUT.format(instruction=record["instruction"], input=record["input"])
    return ALPACA_PROMPT_NO_INPUT.format(instruction=record["instruction"])


@dataclass(frozen=True)
class Example:
    """One tokenized example: 1-D ``input_ids`` and ``labels`` (``-100`` where no loss)."""

    input_ids: torch.Tensor
    labels: torch.Tensor


def tokenize_alpaca(tokenizer: Any, records: Sequence[Mapping[str, str]]) -> list[Example]:
    """Tokenize Alpaca records as Stanford Alpaca trains them: ``BOS prompt response EOS`` with
    the BOS and prompt tokens masked (``-100``) and the response and EOS tokens kept.

    As in Alpaca's ``train.py``, prompt and prompt+response are tokenized and the response tokens
    are the tokens of prompt+response past the prompt's length. BOS is added only if the
    tokenizer has one; EOS is required.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; Alpaca responses must end with EOS")
    bos = [] if tokenizer.bos_token_id is None else [int(tokenizer.bos_token_id)]
    prompts = [format_alpaca_prompt(r) for r in records]
    fulls = [p + r["output"] for p, r in zip(prompts, records)]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(fulls, add_special_tokens=False)["input_ids"]
    examples = []
    for i, (p, f) in enumerate(zip(prompt_ids, full_ids)):
        response = list(f[len(p) :])
        if not response:
            raise ValueError(f"record {i}: the response encodes to no tokens")
        ids = [*bos, *f, int(eos)]
        labels = [IGNORE_INDEX] * (len(bos) + len(p)) + response + [int(eos)]
        examples.append(Example(torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)))
    return examples


# --------------------------------------------------------------------------------------- packing
class PackedDataset(torch.utils.data.Dataset):
    """Fixed-length training sequences: item ``i`` is ``{"input_ids": [seq_len], "labels": [seq_len]}``.

    Built from a token stream (consecutive non-overlapping chunks, ``labels == input_ids``) or
    from tokenized examples (concatenated in order, then cut into chunks; the ``-100`` masks
    travel with their tokens, and an example may span two chunks). The incomplete tail is
    dropped. Deterministic.

    Example:
        >>> ds = PackedDataset.from_tokens(torch.arange(10), seq_len=4)
        >>> len(ds), ds[1]["input_ids"].tolist()
        (2, [4, 5, 6, 7])
    """

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
        if input_ids.ndim != 2 or input_ids.shape != labels.shape:
            raise ValueError(f"input_ids and labels must be equal [n, seq_len], got {input_ids.shape}, {labels.shape}")
        self.input_ids = input_ids.long()
        self.labels = labels.long()

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor, seq_len: int, name: str = "the token stream") -> PackedDataset:
        """Cut a 1-D token stream into ``len(tokens) // seq_len`` sequences of ``seq_len``."""
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        ids = _chunk(tokens, seq_len, name)
        return cls(ids, ids.clone())

    @classmethod
    def from_examples(cls, examples: Sequence[Example], seq_len: int, name: str = "the examples") -> PackedDataset:
        """Pack tokenized examples (e.g. from ``tokenize_alpaca``) into sequences of ``seq_len``."""
        if not examples:
            raise ValueError(f"no examples in {name}")
        ids = torch.cat([e.input_ids for e in examples])
        labels = torch.cat([e.labels for e in examples])
        return cls(_chunk(ids, seq_len, name), _chunk(labels, seq_len, name))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def _chunk(x: torch.Tensor, seq_len: int, name: str) -> torch.Tensor:
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    n = x.numel() // seq_len
    if n == 0:
        raise ValueError(f"no complete sequence of {seq_len} tokens in {name} ({x.numel()} tokens)")
    return x[: n * seq_len].reshape(n, seq_len).clone()


def check_seq_len(seq_len: int, model_config: Any) -> int:
    """Check that ``seq_len`` fits the model's context; returns the context length.

    Reads ``max_position_embeddings`` (or ``n_positions`` / ``max_seq_len``) from a config object
    or mapping, e.g. a Hugging Face ``model.config``.

    Example:
        >>> check_seq_len(256, {"max_position_embeddings": 512})
        512
        >>> check_seq_len(1024, {"max_position_embeddings": 512})
        Traceback (most recent call last):
        ...
        ValueError: seq_len=1024 exceeds the model's context of 512 tokens (max_position_embeddings)
    """
    for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
        value = model_config.get(key) if isinstance(model_config, Mapping) else getattr(model_config, key, None)
        if value is not None:
            break
    else:
        raise ValueError("cannot find the model's context length (max_position_embeddings) in its config")
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if seq_len > value:
        raise ValueError(f"seq_len={seq_len} exceeds the model's context of {value} tokens ({key})")
    return int(value)


__all__ = [
    "IGNORE_INDEX",
    "ALPACA_PROMPT_INPUT",
    "ALPACA_PROMPT_NO_INPUT",
    "Example",
    "PackedDataset",
    "check_seq_len",
    "format_alpaca_prompt",
    "load_alpaca",
    "load_text",
    "split_documents",
    "split_records",
    "split_text",
    "tokenize_alpaca",
    "tokenize_text",
]
