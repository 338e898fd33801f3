"""edkm.data.text: loading errors, held-out split, tokenization, Alpaca masking, packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import edkm
from edkm.data.text import (
    IGNORE_INDEX,
    PackedDataset,
    check_seq_len,
    format_alpaca_prompt,
    load_alpaca,
    load_text,
    split_documents,
    split_records,
    split_text,
    tokenize_alpaca,
    tokenize_text,
)

ASSETS = Path(edkm.__file__).parent / "assets"
STORIES = [
    ASSETS / "tinystories" / "tinystories_val.txt",
    Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories" / "tinystories_val.txt",
]
ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruction" / "alpaca_200.json"


def _stories_path() -> Path:
    path = next((p for p in STORIES if p.is_file()), None)
    if path is None:
        pytest.skip("TinyStories text not available")
    return path


@pytest.fixture(scope="module")
def tok(make_tokenizer):
    """A small byte-level BPE tokenizer with BOS added by default (like Llama's)."""
    return make_tokenizer(["Once upon a time there was a little girl. ### Instruction: Response: Input:"] * 4, 320)


# ------------------------------------------------------------------------------- load_text
def test_load_text_missing_names_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_text(missing)


def test_load_text_empty(tmp_path):
    (tmp_path / "e.txt").write_text(" \n\n")
    with pytest.raises(ValueError, match="empty"):
        load_text(tmp_path / "e.txt")


# ----------------------------------------------------------------------------- load_alpaca
def _write(tmp_path: Path, content: str) -> Path:
    p = tmp_path / "a.json"
    p.write_text(content)
    return p


GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi!"}


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "empty"),
        ('[{"instruction": ', "not valid JSON"),
        (json.dumps({"instruction": "x", "output": "y"}), "expected a JSON list"),
        ("[]", "no records"),
        (json.dumps([GOOD, "text"]), "record 1: expected an object"),
        (json.dumps([GOOD, {"input": "", "output": "y"}]), "record 1: missing key 'instruction'"),
        (json.dumps([GOOD, GOOD, {"instruction": "x"}]), "record 2: missing key 'output'"),
        (json.dumps([{"instruction": "x", "input": 3, "output": "y"}]), "record 0: field 'input' must be a string"),
        (json.dumps([{"instruction": "x", "output": None}]), "record 0: field 'output' must be a string"),
        (json.dumps([GOOD, {"instruction": "Write a poem.", "input": "", "output": ""}]), "record 1: empty 'output'"),
        (json.dumps([{"instruction": " ", "output": "y"}]), "record 0: empty 'instruction'"),
    ],
)
def test_load_alpaca_errors(tmp_path, content, match):
    with pytest.raises(ValueError, match=match):
        load_alpaca(_write(tmp_path, content))


def test_load_alpaca_missing_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_alpaca(tmp_path / "missing.json")


def test_load_alpaca_normalizes(tmp_path):
    recs = load_alpaca(_write(tmp_path, json.dumps([{"instruction": "a", "output": "b", "extra": 1}])))
    assert recs == [{"instruction": "a", "input": "", "output": "b"}]


@pytest.mark.skipif(not ALPACA.is_file(), reason="shared Alpaca sample not available")
def test_load_alpaca_real_file():
    recs = load_alpaca(ALPACA)
    assert len(recs) == 200 and recs[0]["instruction"] == "Give three tips for staying healthy."


# ------------------------------------------------------------------------------- splitting
def test_split_text_last_fraction_by_characters():
    text = _stories_path().read_text()
    train, held = split_text(text, holdout=0.2)
    assert train + held == text
    target = round(0.2 * len(text))
    assert len(held) >= target
    # the cut moved back at most one paragraph, to a paragraph start
    assert len(held) - target < max(len(d) for d in split_documents(text)) + 4
    assert train.endswith("\n\n") and not held[0].isspace()


def test_split_text_falls_back_to_whitespace():
    train, held = split_text("one two three four five six seven eight nine ten", holdout=0.2)
    assert held == "eight nine ten" and train.endswith(" ")  # >= 20 % (10 of 49 characters)


def test_split_text_bad_fraction():
    with pytest.raises(ValueError, match="holdout"):
        split_text("a b c", holdout=1.0)


def test_split_records():
    train, held = split_records(list(range(200)), holdout=0.1)
    assert train == list(range(180)) and held == list(range(180, 200))
    with pytest.raises(ValueError, match="at least 2"):
        split_records([1], 0.5)


# ------------------------------------------------------------------------------ tokenizing
def test_tokenize_text_bos_per_document(tok):
    text = "Once upon a time.\n\nThere was a girl.\nShe ran.\n\n\n  \nThe end."
    stream = tokenize_text(tok, text)
    docs = ["Once upon a time.", "There was a girl.\nShe ran.", "The end."]
    expected = [t for d in docs for t in tok.encode(d)]  # default encode adds BOS
    assert stream.dtype == torch.long and stream.tolist() == expected
    assert (stream == tok.bos_token_id).sum() == 3


def test_alpaca_masking(tok):
    recs = [
        {"instruction": "Say hi.", "input": "", "output": "Hi there!"},
        {"instruction": "Repeat the input.", "input": "a girl", "output": "a girl"},
    ]
    examples = tokenize_alpaca(tok, recs)
    for rec, ex in zip(recs, examples):
        prompt = format_alpaca_prompt(rec)
        assert ("### Input:" in prompt) == bool(rec["input"])
        p = tok.encode(prompt, add_special_tokens=False)
        f = tok.encode(prompt + rec["output"], add_special_tokens=False)
        ids, labels = ex.input_ids.tolist(), ex.labels.tolist()
        assert ids == [tok.bos_token_id, *f, tok.eos_token_id]
        assert labels[: 1 + len(p)] == [IGNORE_INDEX] * (1 + len(p))  # BOS + prompt masked
        assert labels[1 + len(p) :] == ids[1 + len(p) :]  # response kept
        assert labels[-1] == tok.eos_token_id  # response followed by EOS, which is learned
        assert tok.decode(ids[1 + len(p) : -1]) == rec["output"]


# --------------------------------------------------------------------------------- packing
def test_pack_tokens_shapes():
    ds = PackedDataset.from_tokens(torch.arange(103), seq_len=10)
    assert len(ds) == 10 and ds.input_ids.shape == (10, 10) and ds.seq_len == 10
    assert torch.equal(ds.input_ids.flatten(), torch.arange(100))
    assert torch.equal(ds[3]["labels"], ds[3]["input_ids"])


def test_pack_examples_preserves_masks(tok):
    recs = [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i)))} for i in range(1, 9)]
    examples = tokenize_alpaca(tok, recs)
    ds = PackedDataset.from_examples(examples, seq_len=32)
    n = sum(e.input_ids.numel() for e in examples) // 32
    assert ds.input_ids.shape == ds.labels.shape == (n, 32)
    assert torch.equal(ds.input_ids.flatten(), torch.cat([e.input_ids for e in examples])[: n * 32])
    assert torch.equal(ds.labels.flatten(), torch.cat([e.labels for e in examples])[: n * 32])
    kept = ds.labels != IGNORE_INDEX
    assert torch.equal(ds.labels[kept], ds.input_ids[kept])
    assert 0 < kept.sum() < kept.numel()


def test_pack_empty_split_message():
    with pytest.raises(ValueError, match=r"no complete sequence of 64 tokens in held-out text \(50 tokens\)"):
        PackedDataset.from_tokens(torch.arange(50), seq_len=64, name="held-out text")


def test_check_seq_len():
    from types import SimpleNamespace

    assert check_seq_len(512, SimpleNamespace(max_position_embeddings=512)) == 512
    with pytest.raises(ValueError, match="exceeds the model's context of 512"):
        check_seq_len(513, SimpleNamespace(max_position_embeddings=512))
    with pytest.raises(ValueError, match="cannot find"):
        check_seq_len(8, SimpleNamespace())


def test_import_stays_light():
    import subprocess
    import sys

    code = "import edkm.data.text, edkm.eval, sys; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
