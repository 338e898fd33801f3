"""Every common Hugging Face causal-LM architecture, as tiny random models built offline from configs.

palettize -> a few training steps -> finalize -> save -> reload (each way in ``RELOADS``) -> identical
logits, with no two-dimensional weight left unclustered. GPT-2's Conv1D projections, OPT's learned
positional embedding (its own forward with ``position_ids``) and Gemma's scaled word embedding
(x sqrt(hidden)) are the cases a plain nn.Linear / nn.Embedding swap gets wrong.
"""

from __future__ import annotations

import copy

import pytest
import torch

import edkm
from edkm.config import EMBEDDING_LAYERS
from edkm.export.format import read_header
from edkm.layers.lut import LUTModule
from edkm.transform import clustered_fraction, unclustered_weights

pytest.importorskip("transformers")

VOCAB = 128
ARCHS = ("llama", "mistral", "qwen2", "phi3", "gemma", "gpt2", "opt")
PLAN = dict(bits=3, overrides={EMBEDDING_LAYERS: {"bits": 8}})


def load_packed(path, model):
    return edkm.load_palettized(path)


def save_folder_from_pretrained(path, model):
    """The Hugging Face way: ``save_folder`` (what ``edkm compress --out`` writes), then plain ``from_pretrained``."""
    from transformers import AutoModelForCausalLM

    folder = edkm.save_folder(model, path.parent / "folder")
    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)


RELOADS = {"load_palettized": load_packed, "save_folder+from_pretrained": save_folder_from_pretrained}


@pytest.mark.parametrize("arch", ARCHS)
def test_train_finalize_save_reload(arch, tmp_path, tiny_causal_lm):
    model = tiny_causal_lm(arch)
    x = torch.randint(3, VOCAB, (2, 12))
    edkm.palettize_(model, edkm.PalettizeConfig(**PLAN))
    assert unclustered_weights(model) == []  # no 2-D weight silently left in fp32 (Conv1D, subclasses included)
    fraction = clustered_fraction(model)
    assert fraction > 0.9, f"{arch}: only {fraction:.1%} of the parameters clustered"
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        prepared = model(x).logits
        edkm.finalize_(model)
        finalized = model(x).logits
    assert torch.equal(prepared, finalized)
    assert clustered_fraction(model) == pytest.approx(fraction)
    path = tmp_path / "model.edkm.safetensors"
    edkm.save_palettized(model, path)
    for way, reload in RELOADS.items():
        loaded = reload(path, model).eval()
        with torch.no_grad():
            assert torch.equal(loaded(x).logits, finalized), f"{arch}: logits differ after {way}"
        assert clustered_fraction(loaded) == pytest.approx(fraction)
    print(f"{arch}: {fraction:.1%} of the parameters clustered")


@pytest.mark.parametrize("arch", ARCHS)
def test_8bit_clustering_keeps_the_layers_own_forward(arch, tiny_causal_lm):
    """At 8 bits every architecture stays close to its fp32 logits (Gemma's embedding scale, OPT's offset kept)."""
    model = tiny_causal_lm(arch)
    x = torch.randint(3, VOCAB, (2, 12))
    with torch.no_grad():
        reference = model(x).logits
        clustered = edkm.ptq_kmeans_(copy.deepcopy(model), edkm.PalettizeConfig(bits=8))(x).logits
    scale = reference.abs().mean()
    assert (clustered - reference).abs().mean() < 0.05 * scale, arch


def test_tied_weight_gets_the_most_bits_any_name_asks_for(tmp_path, tiny_causal_lm):
    model = tiny_causal_lm("gpt2")  # transformer.wte tied to lm_head
    edkm.ptq_kmeans_(model, edkm.PalettizeConfig(bits=3, overrides={"lm_head": {"bits": 8}}))
    assert model.transformer.wte.lut is model.lm_head.lut and model.lm_head.lut.bits == 8
    assert model.transformer.h[0].attn.c_attn.lut.bits == 3
    edkm.save_palettized(model, tmp_path / "m.safetensors")
    layer = read_header(tmp_path / "m.safetensors")["layers"]["transformer.wte"]
    assert layer["bits"] == 8 and layer["modules"] == ["transformer.wte", "lm_head"]


def test_conv1d_clusters_per_output_channel_group(tiny_causal_lm):
    model = tiny_causal_lm("gpt2")
    conv = model.transformer.h[0].mlp.c_fc  # weight stored (in=32, out=128)
    x = torch.randn(3, 32)
    edkm.ptq_kmeans_(model, edkm.PalettizeConfig(bits=2, group_size=16))
    assert isinstance(model.transformer.h[0].mlp.c_fc, LUTModule)
    lut = model.transformer.h[0].mlp.c_fc.lut
    assert lut.shape == (128, 32) and lut.lut.shape == (8, 4)  # 128 output channels / 16 = 8 LUTs
    weight = model.transformer.h[0].mlp.c_fc.weight  # decoded, in Conv1D's own layout
    assert weight.shape == conv.weight.shape
    for group in range(8):
        assert set(weight[:, group * 16 : (group + 1) * 16].unique().tolist()) <= set(lut.lut[group].float().tolist())
    expected = torch.addmm(conv.bias, x, weight)
    assert torch.equal(model.transformer.h[0].mlp.c_fc(x), expected)
