"""The Hugging Face folder: from_pretrained through the edkm quantizer, save_pretrained round trip,
single-file route."""

import os
import stat

import pytest
import torch

import edkm
from edkm.export import FormatError, is_edkm_folder
from edkm.hf.folder import save_folder
from edkm.models import BUNDLED_MODEL_DIR, load_causal_lm

X = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def palettized():
    model, tok = load_causal_lm(None)
    plan = edkm.PalettizeConfig(bits=3, group_size=4, overrides={"embed_tokens|lm_head": {"bits": 8}})
    edkm.ptq_kmeans_(model, plan)
    return model, tok


@pytest.fixture(scope="module")
def folder(palettized, tmp_path_factory):
    model, tok = palettized
    return save_folder(model, tmp_path_factory.mktemp("hf") / "out", tok)


def test_from_pretrained_gives_identical_logits_without_fp32_weights(palettized, folder):
    from transformers import AutoModelForCausalLM

    from edkm.layers.lut import LUTModule

    model, _ = palettized
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert torch.equal(loaded(X).logits, model(X).logits)
    assert loaded.lm_head.lut is loaded.model.embed_tokens.lut and loaded.lm_head.lut.bits == 8
    assert loaded.model.layers[0].mlp.up_proj.lut.bits == 3 and loaded.model.layers[0].mlp.up_proj.lut.lut.shape[0] > 1
    assert all(p.dim() == 1 for p in loaded.parameters())  # only norms: no dense weight Parameter anywhere
    assert sum(isinstance(m, LUTModule) for m in loaded.modules()) == 5 * 7 + 2
    assert loaded.config.quantization_config.quant_method == "edkm"


def test_folder_contents_and_permissions(folder):
    import json

    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    } <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)  # no pickle anywhere
    quant = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "edkm" and quant["version"] == 1 and quant["bits"] == 3 and quant["group_size"] == 4
    assert quant["layers"]["model.embed_tokens"]["modules"] == ["model.embed_tokens", "lm_head"]
    umask = os.umask(0)
    os.umask(umask)
    for p in folder.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p.name
    assert is_edkm_folder(folder) and not is_edkm_folder(BUNDLED_MODEL_DIR)


def test_save_pretrained_round_trips(folder, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder)
    loaded.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(again(X).logits, loaded(X).logits)
    first, second = load_file(folder / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert first["model.layers.0.mlp.up_proj.lut.indices"].dtype == torch.uint8  # packed 3-bit: 3/8 byte per weight
    assert first["model.layers.0.mlp.up_proj.lut.indices"].numel() == 172 * 64 * 3 // 8


def test_load_palettized_accepts_folder_and_single_file_builds_on_meta(palettized, folder, tmp_path):
    model, _ = palettized
    assert torch.equal(edkm.load_palettized(folder)(X).logits, model(X).logits)
    edkm.save_palettized(model, tmp_path / "m.safetensors")
    single = edkm.load_palettized(tmp_path / "m.safetensors")
    assert torch.equal(single(X).logits, model(X).logits) and single.hf_quantizer is not None
    single.save_pretrained(tmp_path / "converted")  # a single file converts to a folder
    assert torch.equal(edkm.load_palettized(tmp_path / "converted")(X).logits, model(X).logits)


def test_uniform_levels_round_trip(tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = load_causal_lm(None)
    edkm.rtn_(model, edkm.PalettizeConfig(bits=4))
    save_folder(model, tmp_path, tok)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.layers[1].self_attn.q_proj.lut.uniform
    assert torch.equal(loaded(X).logits, model(X).logits)


def test_unclustered_tied_embedding_round_trips(tmp_path):
    model, tok = load_causal_lm(None)
    edkm.ptq_kmeans_(model, edkm.PalettizeConfig(bits=4, exclude=["embed_tokens", "lm_head"]))
    edkm.save_folder(model, tmp_path / "hf", tok)
    edkm.save_palettized(model, tmp_path / "m.safetensors")
    for loaded in (edkm.load_palettized(tmp_path / "hf"), edkm.load_palettized(tmp_path / "m.safetensors")):
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied again by transformers
        assert torch.equal(loaded(X).logits, model(X).logits)


def test_plain_folder_is_not_an_edkm_model(folder, tmp_path):
    with pytest.raises(FormatError, match="weights file of the edkm folder"):
        edkm.load_palettized(folder / "model.safetensors")
    with pytest.raises(FormatError, match="quant_method 'edkm'"):
        edkm.load_palettized(BUNDLED_MODEL_DIR)
    with pytest.raises(FileNotFoundError):
        edkm.load_palettized(tmp_path)
