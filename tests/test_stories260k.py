"""The bundled stories260K Hugging Face checkpoint against the independent llama2.c reference."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import edkm.models
from edkm.models import BUNDLED_MODEL_DIR, BUNDLED_TEXT, load_causal_lm
from edkm.models.llama2c import (
    Llama2cTokenizer,
    llama2c_forward,
    llama2c_to_hf,
    read_llama2c_checkpoint,
    rope_tables,
)

BIN = BUNDLED_MODEL_DIR / "stories260K.bin"
TOK = BUNDLED_MODEL_DIR / "tok512.bin"
GREEDY_PREFIX = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
EDGE_CASES = [
    "",
    " ",
    "   ",
    "a",
    " leading space",
    "trailing spaces  ",
    "multiple   spaces  in    a row",
    "line one\nline two\n\n\nend\n",
    "\ttabs\tand\r\nCRLF\r\n",
    "digits 0123456789, 3.14159 and 1,000,000!",
    "café naïve résumé Ünïcödé ß",
    "日本語のテキスト",
    "emoji 😀🎉 done",
    "“curly quotes” — dashes – and… ellipsis",
    "\u00a0nbsp\u00a0 and a\u0301 combining",
    "\x00\x01 control bytes",
    "<0x41> looks like a byte piece",
]


@pytest.fixture(scope="module")
def hf():
    return load_causal_lm(None)


@pytest.fixture(scope="module")
def reference():
    config, weights = read_llama2c_checkpoint(BIN)
    return config, weights, Llama2cTokenizer(TOK)


@pytest.fixture(scope="module")
def blocks() -> list[str]:
    return BUNDLED_TEXT.read_text(encoding="utf-8").split("\n\n")


def test_bundled_originals_are_unmodified():
    expected = {
        BIN: "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696",
        TOK: "037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312",
        BUNDLED_TEXT: "5fc1fb0113df62b567fb271806cd645ce8d75f59c58ca0b764c03d3b6ff34ca6",
    }
    for path, sha in expected.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha, path


def test_checkpoint_header_and_rope_convention(reference):
    config, weights, _ = reference
    assert config == dict(
        dim=64,
        hidden_dim=172,
        n_layers=5,
        n_heads=8,
        n_kv_heads=4,
        vocab_size=512,
        seq_len=512,
        shared_classifier=True,
    )
    assert sum(v.numel() for k, v in weights.items() if not k.startswith("freq_cis")) == 260_032
    cos, sin = rope_tables(8, 512)  # the interleaved-pair RoPE of llama2c_forward == the file's own tables
    torch.testing.assert_close(cos, weights["freq_cis_real"], atol=1e-5, rtol=0)
    torch.testing.assert_close(sin, weights["freq_cis_imag"], atol=1e-5, rtol=0)


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        read_llama2c_checkpoint(tmp_path / "nope.bin")
    data = BIN.read_bytes()
    for name, blob in {"trunc.bin": data[:-4], "header.bin": data[:10], "extra.bin": data + b"\0\0\0\0"}.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ValueError):
            read_llama2c_checkpoint(tmp_path / name)


def test_config(hf):
    model, tokenizer = hf
    c = model.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (64, 172, 5)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size, c.max_position_embeddings) == (8, 4, 512, 512)
    assert c.tie_word_embeddings and c.rms_norm_eps == 1e-5 and c.rope_parameters["rope_theta"] == 10000
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert len(tokenizer) == 512 and not model.training


def test_greedy_generation(hf, reference):
    model, tokenizer = hf
    config, weights, _ = reference
    out = model.generate(torch.tensor([[1]]), max_new_tokens=40, do_sample=False)
    assert tokenizer.decode(out[0], skip_special_tokens=True).startswith(GREEDY_PREFIX)
    # the reference forward pass makes the same greedy choice at every position
    ref_next = llama2c_forward(config, weights, out[:, :-1]).argmax(-1)
    assert ref_next.tolist() == out[:, 1:].tolist()


def test_tokenizer_matches_run_c_on_tinystories(hf, reference, blocks):
    _, tokenizer = hf
    ref = reference[2]
    for block in blocks[:400]:  # ~90 stories (paragraphs are blank-line separated)
        ids = ref.encode(block)
        assert tokenizer(block).input_ids == ids, block[:60]
        assert tokenizer.decode(ids, skip_special_tokens=True) == block
        assert ref.decode(ids) == block
    chunk = "\n\n".join(blocks[:20])  # several paragraphs, newlines included, as one text
    assert tokenizer(chunk).input_ids == ref.encode(chunk)


@pytest.mark.parametrize("text", EDGE_CASES)
def test_tokenizer_matches_run_c_on_edge_cases(hf, reference, text):
    _, tokenizer = hf
    ref = reference[2]
    ids = ref.encode(text)
    assert tokenizer(text).input_ids == ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert ref.decode(ids) == text


def test_tokenizer_known_differences(hf, reference):
    """Literal special-token strings: HF splits them out unless split_special_tokens=True (then run.c's ids)."""
    _, tokenizer = hf
    ref = reference[2]
    text = "a <s> b </s>"
    assert tokenizer(text).input_ids != ref.encode(text)
    assert tokenizer(text, split_special_tokens=True).input_ids == ref.encode(text)


def _perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits.double().flatten(0, 1), targets.flatten(), reduction="mean")
    return math.exp(nll.item())


def test_perplexity_matches_reference(hf, reference):
    model, tokenizer = hf
    config, weights, _ = reference
    text = BUNDLED_TEXT.read_text(encoding="utf-8")[:100_000]
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids)
    window, n_windows = 256, 80  # 20,480 tokens, non-overlapping windows, every token scored after a BOS
    assert ids.numel() >= window * n_windows
    targets = ids[: window * n_windows].view(n_windows, window)
    inputs = torch.cat([torch.ones(n_windows, 1, dtype=torch.long), targets[:, :-1]], dim=1)
    with torch.no_grad():
        hf_logits = model(inputs).logits
    ref_logits = llama2c_forward(config, weights, inputs)
    ppl_hf, ppl_ref = _perplexity(hf_logits, targets), _perplexity(ref_logits, targets)
    print(f"stories260K ppl on {targets.numel()} TinyStories tokens: HF {ppl_hf:.6f}, llama2.c reference {ppl_ref:.6f}")
    assert abs(ppl_hf - ppl_ref) / ppl_ref < 5e-3
    assert 3.0 < ppl_hf < 6.0  # in-domain (uniform would be 512)
    assert (hf_logits - ref_logits).abs().max().item() < 1e-3


def test_conversion_is_reproducible(tmp_path):
    """scripts/convert_stories260k.py regenerates the bundled folder (up to the transformers version stamp)."""
    out = llama2c_to_hf(BIN, TOK, tmp_path / "hf")
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        new, bundled = (json.loads((d / name).read_text(encoding="utf-8")) for d in (out, BUNDLED_MODEL_DIR))
        new.pop("transformers_version", None)
        bundled.pop("transformers_version", None)
        assert new == bundled, name
    new_weights, bundled_weights = (load_file(d / "model.safetensors") for d in (out, BUNDLED_MODEL_DIR))
    assert new_weights.keys() == bundled_weights.keys()
    assert all(torch.equal(new_weights[k], bundled_weights[k]) for k in new_weights)


def test_load_causal_lm_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_causal_lm(tmp_path)
    (tmp_path / "config.json").write_text((BUNDLED_MODEL_DIR / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_causal_lm(tmp_path)
    with pytest.raises(ValueError, match="file"):
        load_causal_lm(tmp_path / "config.json")


def test_import_does_not_load_transformers():
    src = str(Path(edkm.models.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    code = "import sys, edkm.models, edkm.models.llama2c; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
