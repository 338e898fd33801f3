"""GPTQModel's saved folders read into LUT layers: the library's own dequantized weights, exactly.

The fixture (``tests/data/gptqmodel``, written by GPTQModel 7.6.0 with its ``make_fixture.py``) holds q_proj's and
down_proj's saved tensors of a random 1-layer Llama for GPTQ 3-bit g64 (down_proj's 96 inputs: a partial last
group), GPTQ 4-bit g32 and per channel, and AWQ 4-bit g32, beside the dense weights the library's own
dequantization gives. No GPTQModel is needed here.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from edkm.peers.gptqmodel_format import (
    library_lut,
    load_gptqmodel_,
    pack_rows_for_test,
    read_config,
    read_tensors,
    saved_bits,
    unpack_rows,
)

DATA = Path(__file__).parent / "data" / "gptqmodel"
CONFIGS = ("gptq3_g64", "gptq4_g32", "gptq4_pc", "awq4_g32")


def references(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(DATA / f"{name}.dequantized.safetensors")


@pytest.mark.parametrize("name", CONFIGS)
def test_levels_are_the_librarys_dequantized_weights(name):
    cfg, tensors = read_config(DATA / name), read_tensors(DATA / name)
    for key, dense in references(name).items():
        lut = library_lut(tensors, key.removesuffix(".weight"), cfg, torch.empty(dense.shape))
        assert lut.bits == cfg["bits"] and lut.lut.shape[1] == 1 << cfg["bits"]
        assert torch.equal(lut().half(), dense), key  # bit for bit, partial groups included


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_inverts_the_bit_stream(bits):
    codes = torch.randint(0, 1 << bits, (96, 5), generator=torch.Generator().manual_seed(bits))
    packed = pack_rows_for_test(codes, bits)
    assert packed.shape == (96 * bits // 32, 5) and packed.dtype == torch.int32
    assert torch.equal(unpack_rows(packed, bits, 96), codes)


def test_bits_come_from_the_saved_tensors():
    # GPTQ 3-bit g64 of a 32x32 and a 32x96 layer: 3-bit codes, per group of 64 a 3-bit zero and an fp16 scale
    # (q_proj: one partial group of 32, down_proj: 64 + 32), and a 32-bit group index per input column
    weights = 32 * 32 + 32 * 96
    groups = 1 + 2  # q_proj's 32 inputs: one partial group; down_proj's 96: 64 + 32
    codes, zeros, scales, g_idx = 3 * weights, groups * 3 * 32, groups * 32 * 16, 32 * (32 + 96)
    got = saved_bits(DATA / "gptq3_g64")
    assert got["bits_per_weight"] == pytest.approx((codes + zeros + scales + g_idx) / weights)
    assert got["without_g_idx"] == pytest.approx((codes + zeros + scales) / weights)


def fixture_model(hidden: int = 32, intermediate: int = 96):
    """The random model the fixture's folders were quantized from (make_fixture.py's; GPTQ 32/96, AWQ 64/128)."""
    spec = importlib.util.spec_from_file_location("make_fixture", DATA / "make_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.random_llama(hidden, intermediate)


def test_load_installs_library_layers_and_rtn_elsewhere():
    import edkm
    from edkm.layers.lut import LUTModule

    model = fixture_model()
    plan = edkm.PalettizeConfig(bits=3, overrides={edkm.config.EMBEDDING_LAYERS: {"bits": 8}})
    load_gptqmodel_(model, DATA / "gptq3_g64", plan)
    layer = model.model.layers[0]
    for key, dense in references("gptq3_g64").items():
        module = model.get_submodule(key.removesuffix(".weight"))
        assert isinstance(module, LUTModule) and torch.equal(module.lut().half(), dense)
    assert isinstance(layer.self_attn.k_proj, LUTModule)  # not in the folder: round-to-nearest at 3 bits
    assert layer.self_attn.k_proj.lut.bits == 3
    assert model.model.embed_tokens.lut.bits == 8
    logits = model(torch.tensor([[1, 5, 9]])).logits
    assert torch.isfinite(logits).all()


def test_awq_folds_into_the_norm():
    import edkm

    model = fixture_model(64, 128)
    plan = edkm.PalettizeConfig(bits=4, overrides={edkm.config.EMBEDDING_LAYERS: {"bits": 8}})
    saved = read_tensors(DATA / "awq4_g32")["model.layers.0.input_layernorm.weight"]
    load_gptqmodel_(model, DATA / "awq4_g32", plan)
    assert torch.equal(model.model.layers[0].input_layernorm.weight.data, saved.float())


def copy_config(tmp_path: Path, **changes) -> Path:
    folder = tmp_path / "q"
    shutil.copytree(DATA / "gptq3_g64", folder)
    cfg = json.loads((folder / "quantize_config.json").read_text())
    (folder / "quantize_config.json").write_text(json.dumps({**cfg, **changes}))
    return folder


@pytest.mark.parametrize(
    "changes, message",
    [({"desc_act": True}, "desc_act=False"), ({"method": "qqq"}, "is not read here")],
)
def test_unreadable_configs_are_refused(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        read_config(copy_config(tmp_path, **changes))


def test_a_folder_without_the_files_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no quantize_config.json"):
        read_config(tmp_path)
    with pytest.raises(ValueError, match="no .safetensors file"):
        read_tensors(tmp_path)


def test_shuffled_groups_and_wrong_models_are_refused(tmp_path):
    from safetensors.torch import save_file

    folder = copy_config(tmp_path)
    tensors = read_tensors(folder)
    tensors["model.layers.0.mlp.down_proj.g_idx"] = tensors["model.layers.0.mlp.down_proj.g_idx"].flip(0)
    save_file(tensors, folder / "model.safetensors")
    cfg = read_config(folder)
    with pytest.raises(ValueError, match="desc_act=False"):
        library_lut(tensors, "model.layers.0.mlp.down_proj", cfg, torch.empty(32, 96))
    with pytest.raises(ValueError, match="do not fit"):
        library_lut(tensors, "model.layers.0.self_attn.q_proj", cfg, torch.empty(64, 32))
    import edkm

    with pytest.raises(ValueError, match="pass the model it was quantized from"):
        load_gptqmodel_(fixture_model(64, 128), DATA / "gptq3_g64", edkm.PalettizeConfig(bits=3))  # 64 wide, not 32
