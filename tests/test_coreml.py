"""Core ML export of the bundled model: our LUTs in constexpr_lut_to_dense ops, decoded weights bit for bit.

Prediction needs macOS, so the package is read back (``ct.utils.load_spec`` + the weight blob) and checked;
the traced wrappers themselves run here in torch. Skipped only where coremltools cannot be imported.
"""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools", reason="coremltools (the optional 'coreml' extra) is not installed")

import edkm  # noqa: E402
from edkm.cli.main import main  # noqa: E402
from edkm.cluster import decode  # noqa: E402
from edkm.coreml.layers import conversion_copy  # noqa: E402
from edkm.coreml.trace import StatefulLM, StatelessLM, causal_mask  # noqa: E402
from edkm.coreml.verify import lut_ops, verify_mlpackage  # noqa: E402
from edkm.models import load_causal_lm  # noqa: E402

PLAN = dict(bits=3, overrides={"embed|lm_head": {"bits": 8}})


def packed(tmp_path_factory, group_size):
    """The bundled model clustered and saved as ``edkm compress --out`` does: a Hugging Face folder."""
    model, tokenizer = load_causal_lm(None)
    edkm.ptq_kmeans_(model, edkm.PalettizeConfig(**PLAN, group_size=group_size))
    folder = edkm.save_folder(model, tmp_path_factory.mktemp("packed") / "out", tokenizer)
    return folder, model


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    return packed(tmp_path_factory, 4)  # 4 output channels per LUT: per-grouped-channel LUTs (iOS 18)


def export(path, out, *flags):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["export", "coreml", str(path), "--out", str(out), "--length", "16", *flags])
    return json.loads(printed.getvalue())


@pytest.fixture(scope="module")
def ios18(grouped, tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml") / "m.mlpackage"
    return export(grouped[0], out), out


def test_ios18_grouped_luts_bit_exact(grouped, ios18):
    model = grouped[1]
    report, package = ios18  # exported from the compress output folder
    assert report["ok"] and report["problems"] == []
    assert report["packed_bytes"] == (grouped[0] / "model.safetensors").stat().st_size
    assert report["lut_ops"] == report["clustered_tensors"] == 36  # 35 linears + the tied embedding/lm_head
    assert report["index_bits"] == {"3": 35, "8": 1}
    assert report["packed_bytes"] < report["mlpackage_bytes"] < report["fp16_bytes"]
    # independently of verify_mlpackage: layer 0's q_proj, by name
    op = next(o for o in lut_ops(package) if o["name"].startswith("base_layers_0_self_attn_q_proj_weight"))
    q = model.model.layers[0].self_attn.q_proj.lut
    assert op["index_bits"] == 3 and op["lut"].shape == (16, 1, 8, 1)  # 64 rows / 4 = 16 LUTs of 8 entries
    assert np.array_equal(op["lut"][:, 0, :, 0], q.lut.numpy())
    assert np.array_equal(op["weight"], decode(q.lut, q.indices, q.shape, torch.float16).numpy())


def test_lut_ops_are_decoded_as_coremltools_materializes_them(ios18):
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil.frontend.milproto.load import load as load_program

    from edkm.coreml.verify import WEIGHTS_DIR, decoded_weight

    package = ios18[1]
    spec = ct.utils.load_spec(str(package))
    program = load_program(spec, spec.specificationVersion, str(package / WEIGHTS_DIR))
    ops = [op for op in program.functions["main"].operations if op.op_type == "constexpr_lut_to_dense"]
    assert len(ops) == 36 and any(op.lut.val.shape[0] > 1 for op in ops)  # grouped LUTs among them
    for op in ops:
        assert np.array_equal(decoded_weight(op), op.materialized_val_inference()), op.name


def test_verification_catches_a_changed_weight(grouped, ios18):
    changed = edkm.load_palettized(grouped[0])
    lut = changed.model.layers[2].mlp.up_proj.lut
    indices = lut.indices.clone()  # loaded on CPU: a compact weight, whose indices are assigned, not edited in place
    indices[0, 0] ^= 1
    lut.indices = indices
    report = verify_mlpackage(ios18[1], changed)
    assert not report["ok"] and any("up_proj" in p for p in report["problems"])


def test_ios16_pads_luts_to_16_entries(tmp_path_factory, tmp_path):
    _, model = packed(tmp_path_factory, None)
    path = tmp_path / "model.edkm.safetensors"
    edkm.save_palettized(model, path)
    report = export(path, tmp_path / "m16.mlpackage", "--target", "ios16")  # the single packed file still works
    assert report["ok"] and report["index_bits"] == {"4": 35, "8": 1} and "padded" in report["note"]
    assert all(o["lut"].size in (16, 256) for o in lut_ops(tmp_path / "m16.mlpackage"))


def test_ios16_refuses_grouped_luts(grouped, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", "coreml", str(grouped[0]), "--out", str(tmp_path / "x.mlpackage"), "--target", "ios16"])
    assert "one LUT per tensor" in capsys.readouterr().err


def test_kv_cache_gives_a_stateful_model(grouped, tmp_path):
    import coremltools as ct

    report = export(grouped[0], tmp_path / "kv.mlpackage", "--kv-cache")
    assert report["ok"] and report["lut_ops"] == 36
    spec = ct.utils.load_spec(str(tmp_path / "kv.mlpackage"))
    assert sorted(s.name for s in spec.description.state) == ["key_cache", "value_cache"]
    assert [i.name for i in spec.description.input] == ["input_ids", "mask"]


def test_traced_wrappers_compute_the_models_logits(grouped):
    model = grouped[1]
    ids = torch.randint(3, 512, (1, 10), dtype=torch.int32)
    with torch.no_grad():
        expected = model(ids.long()).logits
        lm = conversion_copy(model)
        assert torch.allclose(StatelessLM(lm)(ids, causal_mask(10, 10)), expected, atol=1e-5)
        step = StatefulLM(lm, 16)
        step(ids[:, :7], causal_mask(7, 7))  # prefill, then three tokens one at a time from the fp16 cache
        last = [step(ids[:, i : i + 1], causal_mask(1, i + 1))[0, -1] for i in range(7, 10)]
    assert torch.allclose(torch.stack(last), expected[0, 7:], atol=2e-2)


@pytest.mark.parametrize(
    "arch",
    ["gpt2", *(pytest.param(a, marks=pytest.mark.slow) for a in ("llama", "mistral", "qwen2", "phi3", "gemma", "opt"))],
)
def test_every_architecture_exports_bit_exact(arch, tiny_causal_lm, tmp_path):
    """Exported from a plain from_pretrained load of the saved folder, checked against the model that was saved.
    GPT-2: Conv1D weights (in, out), so its per-output-channel LUTs group along axis 1; tied wte/lm_head at 8 bits."""
    from transformers import AutoModelForCausalLM

    from edkm.config import EMBEDDING_LAYERS
    from edkm.coreml import export_coreml

    model = tiny_causal_lm(arch)
    group = 4 if arch == "gpt2" else None
    edkm.ptq_kmeans_(model, edkm.PalettizeConfig(bits=3, group_size=group, overrides={EMBEDDING_LAYERS: {"bits": 8}}))
    loaded = AutoModelForCausalLM.from_pretrained(edkm.save_folder(model, tmp_path / arch), local_files_only=True)
    report = verify_mlpackage(
        export_coreml(loaded, tmp_path / f"{arch}.mlpackage", length=16), model
    )  # vs. the original
    assert report["ok"], report["problems"]
    assert report["lut_ops"] == report["clustered_tensors"] and report["index_bits"][3] > 0
    if arch == "gpt2":
        conv = next(o for o in lut_ops(tmp_path / "gpt2.mlpackage") if "h_0_attn_c_attn" in o["name"])
        assert conv["weight"].shape == (32, 96) and conv["lut"].shape == (1, 24, 8, 1)  # 96 output channels / 4


@pytest.mark.parametrize("groups", [1, 4])
def test_sliced_index_search_equals_coremltools(groups):
    from coremltools.optimize._utils import find_indices_for_lut

    from edkm.coreml.convert import sliced_index_search

    lut = np.sort(np.random.default_rng(0).normal(size=(groups, 1, 8, 1)), axis=2)
    weights = np.random.default_rng(1).normal(size=(12, 5))
    assert np.array_equal(
        sliced_index_search(find_indices_for_lut, budget=50)(weights, lut), find_indices_for_lut(weights, lut)
    )


def test_a_wide_8bit_tied_head_exports_within_the_search_budget(tiny_causal_lm, tmp_path, monkeypatch):
    """SmolLM2's 49,152 x 576 tied head at 8 bits made coremltools allocate 27 GiB: the search now goes in slices."""
    from coremltools.optimize import _utils as optimize_utils

    from edkm.config import EMBEDDING_LAYERS
    from edkm.coreml import convert, export_coreml

    model = tiny_causal_lm("llama")
    model.resize_token_embeddings(2048)  # 2,048 x 32 weights x 256 LUT entries = 16.8 M comparisons unsliced
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's
    edkm.ptq_kmeans_(model, edkm.PalettizeConfig(bits=3, overrides={EMBEDDING_LAYERS: {"bits": 8}}))
    seen, search = [], optimize_utils.find_indices_for_lut
    monkeypatch.setattr(
        optimize_utils,
        "find_indices_for_lut",
        lambda w, lut, *a: seen.append(w.size * lut.shape[-2]) or search(w, lut, *a),
    )
    monkeypatch.setattr(convert, "SEARCH_ELEMENTS", 1 << 20)
    report = verify_mlpackage(export_coreml(model, tmp_path / "wide.mlpackage", length=8), model)
    assert report["ok"], report["problems"]
    assert (
        report["index_bits"] == {8: 1, 3: 14}
        and report["clustered_tensors"] == 15
        and max(seen) <= 1 << 20
        and len(seen) > 16
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["missing.edkm.safetensors", "--out", "m.mlpackage"], "no packed edkm model at missing.edkm.safetensors"),
        ([".", "--out", "m.mlpackage"], ". is neither an edkm model folder"),
        (["{packed}", "--out", "m.mlmodel"], "--out must name a .mlpackage folder"),
        (["{packed}", "--out", "m.mlpackage", "--length", "4096"], "exceeds the model's 512 positions"),
    ],
)
def test_bad_input_is_one_clear_error(grouped, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["export", "coreml", *(a.format(packed=grouped[0]) for a in argv)])
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
