"""Crafted packed files are refused with one clear FormatError; files get the usual permissions;
resume never unpickles code."""

import json
import os
import stat
import struct

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import edkm
from edkm.export import FormatError
from edkm.export.layers import digest


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(64, 16), nn.Linear(16, 32), nn.Linear(32, 64))


@pytest.fixture
def saved(tmp_path):
    model = edkm.ptq_kmeans_(tiny(), edkm.PalettizeConfig(bits=3))
    path = tmp_path / "m.safetensors"
    edkm.save_palettized(model, path)
    return path


def craft(path, out, edit_header=None, edit_tensors=None):
    """Rewrite a packed file with ``edit_header(header)`` / ``edit_tensors(tensors)`` and a valid checksum."""
    from safetensors.torch import save_file

    tensors = load_file(path)
    raw = path.read_bytes()
    header = json.loads(json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])["__metadata__"]["edkm"])
    if edit_header:
        edit_header(header)
    if edit_tensors:
        edit_tensors(tensors)
    header["sha256"] = digest(tensors, {k: v for k, v in header.items() if k != "sha256"})
    save_file(tensors, out, metadata={"edkm": json.dumps(header)})
    return out


@pytest.mark.parametrize(
    "edit_header,edit_tensors,message",
    [
        (
            None,
            lambda t: t.update({"1.lut": t["1.lut"][:, :4].contiguous()}),
            r"'1.lut' is F16 \[1, 4\], expected F16 \[1, 8\]",
        ),
        (lambda h: h["layers"]["1"].update(bits=2), None, r"'1.lut' is F16 \[1, 8\], expected F16 \[1, 4\]"),
        (lambda h: h["layers"]["1"].update(dtype="__import__('os')"), None, "dtype must be one of"),
        (lambda h: h["aliases"].update({"2.extra": "missing.key"}), None, "alias '2.extra' points to 'missing.key'"),
        (lambda h: h["layers"]["1"].update(shape=[1 << 40, 1 << 40]), None, "more than any real weight"),
        (lambda h: h["layers"]["1"].update(groups=5), None, "5 groups do not divide"),
        (lambda h: h["layers"]["1"].update(modules=["1", "0"]), None, "module '0' is listed by layers"),
        (lambda h: h["layers"]["1"].update(modules=["1", "7"]), None, "no module '7'"),
        (lambda h: h.update(version="3"), None, "version must be an integer"),
        (None, lambda t: t.update({"1.lut": torch.full_like(t["1.lut"], float("nan"))}), "NaN or infinite"),
        (None, lambda t: t.update({"1.bias": torch.zeros(33)}), r"'1.bias' has shape \[33\], the model expects \[32\]"),
        (None, lambda t: t.update({"extra": torch.zeros(1)}), r"unexpected \['extra'\]"),
    ],
)
def test_crafted_files_refused_with_one_clear_error(saved, tmp_path, edit_header, edit_tensors, message):
    bad = craft(saved, tmp_path / "bad.safetensors", edit_header, edit_tensors)
    with pytest.raises(FormatError, match=message):
        edkm.load_palettized(bad, tiny())


CONV = "transformer.h.0.mlp.c_fc"  # GPT-2 Conv1D: weight stored (in=32, out=128), clustered (out, in)


@pytest.fixture(scope="module")
def gpt2_saved(tmp_path_factory, tiny_causal_lm):
    """A 3-bit GPT-2 (Conv1D projections) as a single file and as a Hugging Face folder."""
    root = tmp_path_factory.mktemp("gpt2")
    model = edkm.ptq_kmeans_(tiny_causal_lm("gpt2"), edkm.PalettizeConfig(bits=3))
    edkm.save_palettized(model, root / "m.safetensors")
    edkm.save_folder(model, root / "folder")
    return root


@pytest.mark.parametrize(
    "edit_layers,message",
    [
        (
            lambda layers: layers[CONV]["modules"].append("transformer.h.0.ln_1"),
            "module 'transformer.h.0.ln_1' is a LayerNorm, not a Linear, Conv1D or Embedding",
        ),
        (
            lambda layers: layers[CONV].update(shape=[32, 128]),
            rf"module '{CONV}' has weight shape \[128, 32\], the file \[32, 128\]",
        ),
    ],
)
def test_crafted_conv1d_model_refused(gpt2_saved, tmp_path, tiny_causal_lm, edit_layers, message):
    """Conv1D layers load (shape checked output channels first), but a LUT never lands in a norm layer or a
    transposed shape, whichever loader reads the file: built from its config, into a given model, from_pretrained."""
    from transformers import AutoModelForCausalLM

    bad = craft(gpt2_saved / "m.safetensors", tmp_path / "bad.safetensors", lambda h: edit_layers(h["layers"]))
    with pytest.raises(FormatError, match=message):
        edkm.load_palettized(bad)
    with pytest.raises(FormatError, match=message):
        edkm.load_palettized(bad, tiny_causal_lm("gpt2"))
    folder = tmp_path / "folder"
    folder.mkdir()
    for item in (gpt2_saved / "folder").iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    edit_layers(config["quantization_config"]["layers"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match=message):
        AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)


def test_header_is_covered_by_the_checksum(saved, tmp_path):
    raw = saved.read_bytes()
    start = raw.index(b"palettize_config")
    edited = raw[:start] + raw[start:].replace(
        b'"cluster_dtype\\": \\"bfloat16\\"', b'"cluster_dtype\\": \\"bfloat32\\"', 1
    )
    assert edited != raw and len(edited) == len(raw)
    (tmp_path / "e.safetensors").write_bytes(edited)
    with pytest.raises(FormatError, match="checksum mismatch"):
        edkm.load_palettized(tmp_path / "e.safetensors", tiny())


def test_flipped_header_byte_is_one_line_cli_error(saved, tmp_path, capsys):
    from edkm.cli.main import main

    raw = bytearray(saved.read_bytes())
    raw[40] ^= 0x55
    (tmp_path / "f.safetensors").write_bytes(bytes(raw))
    with pytest.raises(SystemExit):
        main(["generate", str(tmp_path / "f.safetensors")])
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and "f.safetensors" in err


def test_saved_files_respect_the_umask(saved):
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(saved.stat().st_mode) == 0o666 & ~umask


class Payload:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (open, (str(self.sentinel), "w"))


def test_resume_refuses_pickled_code(tmp_path):
    from edkm.training.loop import TrainConfig, train

    sentinel = tmp_path / "pwned"
    torch.save({"model": Payload(sentinel)}, tmp_path / "ckpt.pt")
    model = nn.Linear(4, 4)
    data = torch.randn(8, 4)
    with pytest.raises(ValueError, match="not a readable edkm checkpoint"):
        train(
            lambda x, y: ((model(x) - y) ** 2).sum(),
            model,
            data,
            data,
            TrainConfig(steps=2, batch_size=4, progress=False),
            tmp_path / "ckpt.pt",
            resume=True,
        )
    assert not sentinel.exists()
